"""Connections to the upstream MongoDB.

One upstream connection per client connection keeps cursors, sessions, transactions,
exhaust streams and SCRAM conversations correct with no bookkeeping: whatever state the
client builds up lives on its own upstream connection."""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from typing import Any

import bson
import trio
from pymongo.uri_parser import parse_uri

from proxy.framed import FramedStream
from proxy.wire.header import OpCode
from proxy.wire.opmsg import OpMsg, decode_op_msg, encode_op_msg

__all__ = ["UpstreamError", "UpstreamTarget", "open_upstream"]


class UpstreamError(Exception):
    """The upstream cannot be reached or did not answer as MongoDB does."""


@dataclass(frozen=True)
class UpstreamTarget:
    """Where the upstream is and how to reach it, read from a MongoDB URI."""

    uri: str
    hosts: tuple[tuple[str, int], ...]
    tls: bool
    tls_ca_file: str | None
    tls_allow_invalid: bool
    connect_timeout: float

    @classmethod
    def from_uri(cls, uri: str, connect_timeout: float = 5.0) -> UpstreamTarget:
        if uri.startswith("mongodb+srv://"):
            raise UpstreamError("mongodb+srv:// URIs are not supported; list the hosts instead")
        try:
            parsed = parse_uri(uri)
        except Exception as exc:  # pymongo raises InvalidURI, ConfigurationError, ValueError
            raise UpstreamError(f"invalid upstream URI: {exc}") from exc
        # pymongo hands back canonical casing (tlsCAFile) in a plain dict; look up by
        # lower-case names whatever the version.
        options: dict[str, Any] = {str(k).lower(): v for k, v in parsed["options"].items()}
        tls = bool(options.get("tls") or options.get("ssl"))
        return cls(
            uri=uri,
            hosts=tuple((host, int(port)) for host, port in parsed["nodelist"]),
            tls=tls,
            tls_ca_file=options.get("tlscafile"),
            tls_allow_invalid=bool(
                options.get("tlsallowinvalidcertificates") or options.get("tlsinsecure")
            ),
            connect_timeout=connect_timeout,
        )

    def ssl_context(self) -> ssl.SSLContext:
        context = ssl.create_default_context(cafile=self.tls_ca_file)
        if self.tls_allow_invalid:
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        return context


async def _connect(target: UpstreamTarget, host: str, port: int) -> FramedStream:
    stream: trio.abc.Stream = await trio.open_tcp_stream(host, port)
    if target.tls:
        tls_stream = trio.SSLStream(stream, target.ssl_context(), server_hostname=host)
        await tls_stream.do_handshake()
        stream = tls_stream
    return FramedStream(stream)


async def _is_writable_primary(conn: FramedStream) -> tuple[bool, str | None]:
    hello = OpMsg(flags=0, body=bson.encode({"hello": 1, "$db": "admin"}))
    await conn.send(encode_op_msg(hello, request_id=1, response_to=0))
    frame = await conn.receive_frame()
    if frame is None or frame.header.op_code != OpCode.OP_MSG:
        raise UpstreamError("upstream closed the connection or answered hello oddly")
    reply = bson.decode(decode_op_msg(frame.header, frame.payload).body)
    writable = bool(reply.get("isWritablePrimary") or reply.get("ismaster"))
    return writable, reply.get("primary")


async def open_upstream(target: UpstreamTarget) -> FramedStream:
    """Connect to the upstream's writable primary (or its only server).

    Raises UpstreamError promptly when none answers within the connect timeout, so the
    client's connection is closed and its driver retries as after any network error."""
    errors: list[str] = []
    candidates = list(target.hosts)
    with trio.move_on_after(target.connect_timeout):
        for host, port in candidates:
            try:
                conn = await _connect(target, host, port)
            except (OSError, trio.BrokenResourceError, ssl.SSLError) as exc:
                errors.append(f"{host}:{port}: {exc}")
                continue
            if len(target.hosts) == 1:
                return conn
            try:
                writable, primary = await _is_writable_primary(conn)
            except (OSError, trio.BrokenResourceError, UpstreamError) as exc:
                errors.append(f"{host}:{port}: {exc}")
                await conn.aclose()
                continue
            if writable:
                return conn
            await conn.aclose()
            if primary:
                primary_host, _, primary_port = primary.rpartition(":")
                if (primary_host, int(primary_port)) not in candidates:
                    candidates.append((primary_host, int(primary_port)))
        raise UpstreamError("no writable upstream server: " + "; ".join(errors))
    raise UpstreamError(
        f"upstream did not answer within {target.connect_timeout:g}s: " + "; ".join(errors)
    )
