"""The floor of a trio proxy: a frame forwarder that does nothing else.

For each client connection it opens one upstream connection (as modelgate does) and
runs two pumps: read a frame's 16-byte header, read the rest of the frame, send the
frame on. No parsing beyond the length, no routing, no metrics. `bench wire` measures
it beside modelgate, so that what modelgate adds over it is what its own work costs,
not what any Python proxy on trio pays for its sockets and its scheduler.

The sockets are read and written directly when they are ready and trio waits only when
they are not (or first, once frames come one at a time), as `proxy.framed.FramedStream`
does: the floor uses the cheapest I/O a trio program has, never a slower one that would
flatter modelgate.

Run as `python -m bench.support.forwarder --listen PORT --upstream HOST:PORT`; it
prints `listening` once it accepts connections. `forwarder()` starts it as a child
process on a free port."""

from __future__ import annotations

import argparse
import contextlib
import socket
import struct
import subprocess
import sys
from collections.abc import Iterator, Sequence

import trio

from bench.support.processes import ROOT, BenchError

__all__ = ["forward", "forwarder", "main", "serve"]

HEADER_BYTES = 16
_RECEIVE_CHUNK = 64 * 1024
_LENGTH = struct.Struct("<i")
# As in proxy.framed: a checkpoint every so many frames keeps one busy connection from
# starving the others without a scheduler pass per frame.
_CHECKPOINT_EVERY = 16


class _Connection:
    """One socket, read into a buffer of its own and written whole."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.sock: socket.socket = stream.socket._sock  # type: ignore[attr-defined]
        self.buffer = bytearray()
        # As in proxy.framed: once a frame had to be waited for (request and reply take
        # turns), wait for the socket before reading it, rather than have a recv that
        # finds nothing raise; until more than a frame comes at once.
        self.wait_first = False

    async def fill(self, size: int) -> bool:
        """Buffer at least `size` bytes; False when the peer closed first."""
        if self.wait_first and not self.buffer:
            await trio.lowlevel.wait_readable(self.sock)
        while len(self.buffer) < size:
            try:
                data = self.sock.recv(_RECEIVE_CHUNK)
            except BlockingIOError:
                self.wait_first = True
                await trio.lowlevel.wait_readable(self.sock)
                continue
            if not data:
                return False
            self.buffer += data
        return True

    async def send(self, data: bytes | bytearray) -> None:
        view = memoryview(data)
        while view:
            try:
                sent = self.sock.send(view)
            except BlockingIOError:
                await trio.lowlevel.wait_writable(self.sock)
                continue
            view = view[sent:]


async def _pump(source: _Connection, sink: _Connection) -> None:
    frames = 0
    while await source.fill(HEADER_BYTES):
        (length,) = _LENGTH.unpack_from(source.buffer)
        if length < HEADER_BYTES or not await source.fill(length):
            return
        frame = source.buffer[:length]
        del source.buffer[:length]
        if source.buffer:
            source.wait_first = False
        await sink.send(frame)
        frames += 1
        if frames % _CHECKPOINT_EVERY == 0:
            await trio.lowlevel.checkpoint()


async def forward(client_stream: trio.SocketStream, upstream: tuple[str, int]) -> None:
    """Forward frames between `client_stream` and a new connection to `upstream` until
    either side closes or fails; both are closed then."""
    async with client_stream:
        try:
            upstream_stream = await trio.open_tcp_stream(*upstream)
        except OSError:
            return
        async with upstream_stream:
            client, server = _Connection(client_stream), _Connection(upstream_stream)
            try:
                async with trio.open_nursery() as nursery:

                    async def pump_then_stop(source: _Connection, sink: _Connection) -> None:
                        await _pump(source, sink)
                        nursery.cancel_scope.cancel()

                    nursery.start_soon(pump_then_stop, client, server)
                    nursery.start_soon(pump_then_stop, server, client)
            except* OSError:
                pass  # a reset connection ends this client's forwarding, nothing else


async def serve(
    port: int,
    upstream: tuple[str, int],
    *,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    listeners = await trio.open_tcp_listeners(port, host="127.0.0.1")
    task_status.started(listeners[0].socket.getsockname()[1])

    async def handler(stream: trio.SocketStream) -> None:
        await forward(stream, upstream)

    await trio.serve_listeners(handler, listeners)


def _address(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host or "127.0.0.1", int(port)


async def _main(port: int, upstream: tuple[str, int]) -> None:
    async with trio.open_nursery() as nursery:
        await nursery.start(serve, port, upstream)
        print("listening", flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.support.forwarder", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--listen", type=int, required=True, metavar="PORT")
    parser.add_argument("--upstream", type=_address, required=True, metavar="HOST:PORT")
    args = parser.parse_args(argv)
    try:
        trio.run(_main, args.listen, args.upstream)
    except KeyboardInterrupt:
        return 130
    return 0


def upstream_address(uri: str) -> tuple[str, int]:
    """The first host of a mongodb:// URI without credentials or TLS (the forwarder
    speaks plain TCP to one server)."""
    hosts = uri.partition("://")[2].split("/", 1)[0]
    if "@" in hosts:
        raise BenchError(
            "the forwarder cannot authenticate: give an upstream URI without credentials"
        )
    return _address(hosts.split(",")[0])


@contextlib.contextmanager
def forwarder(upstream_uri: str) -> Iterator[str]:
    """Run the forwarder as a child process on a free port in front of `upstream_uri`;
    yield the URI to reach the upstream through it."""
    from proxy.embedded import free_port

    host, port = upstream_address(upstream_uri)
    listen = free_port()
    command = [sys.executable, "-m", "bench.support.forwarder", "--listen", str(listen)]
    command += ["--upstream", f"{host}:{port}"]
    with subprocess.Popen(
        command, cwd=ROOT, stdout=subprocess.PIPE, stdin=subprocess.DEVNULL
    ) as process:
        try:
            assert process.stdout is not None
            if process.stdout.readline().strip() != b"listening":
                raise BenchError("the frame forwarder did not start")
            # Straight to the one server behind it: a replica-set member's hello would
            # otherwise send the driver to the members themselves.
            yield f"mongodb://127.0.0.1:{listen}/?directConnection=true"
        finally:
            process.terminate()  # SIGTERM ends a trio program at once; Popen waits


if __name__ == "__main__":
    sys.exit(main())
