"""`modelgate serve | bench | demo`."""

from __future__ import annotations

import argparse
import functools
import logging
import os
import sys
from collections.abc import Sequence

__all__ = ["main"]

log = logging.getLogger("modelgate")


def _configure_logging(level: str, log_format: str = "text") -> None:
    from proxy.logs import configure

    configure(level, log_format)


def _serve(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    from proxy.settings import InvalidSetting
    from proxy.settings_sources import load_settings, settings_toml

    try:
        settings = load_settings(args, os.environ)
    except InvalidSetting as exc:
        parser.error(str(exc))  # exits 2, like a flag argparse refuses itself
    if getattr(args, "print_config", False):
        print(settings_toml(settings), end="")
        return 0

    import trio

    from engine.errors import first_exception
    from engine.runtime import report_onnxruntime
    from proxy.app import run_proxy
    from proxy.embedded import EmbeddedUpstream, EmbeddedUpstreamError
    from proxy.server import ListenError
    from proxy.upstream import UpstreamError

    _configure_logging(settings.log_level, settings.log_format)
    report_onnxruntime(settings.runtime)
    embedded = None
    upstream = settings.upstream
    if upstream is None:
        embedded = EmbeddedUpstream(settings.data_dir / "db", log_path=None)
        try:
            embedded.start()
        except EmbeddedUpstreamError as exc:
            log.error("%s", exc)
            return 2
        upstream = embedded.uri
        log.info("embedded upstream ready (data in %s)", settings.data_dir / "db")
    failure: BaseException | None = None
    try:
        trio.run(run_proxy, settings, upstream)
    # The nurseries wrap what their tasks raise in exception groups.
    except* (UpstreamError, ListenError) as group:
        failure = first_exception(group)
    finally:
        if embedded is not None:
            embedded.stop()
    if failure is not None:
        log.error("%s", failure)
        return 2
    return 0


def _demo(args: argparse.Namespace) -> int:
    from proxy.demo import run

    _configure_logging("warning")
    return run(args)


def build_parser() -> argparse.ArgumentParser:
    from proxy.settings import add_serve_arguments

    parser = argparse.ArgumentParser(
        prog="modelgate",
        description="A MongoDB-wire-compatible proxy that runs ONNX models on the documents "
        "written through it. Point any MongoDB driver at it instead of MongoDB.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    serve = commands.add_parser(
        "serve",
        help="run the proxy",
        description="Run the proxy in front of a MongoDB (or an embedded SecantusDB).",
    )
    add_serve_arguments(serve)
    serve.set_defaults(handler=functools.partial(_serve, serve))
    demo = commands.add_parser(
        "demo",
        help="train a digits classifier through modelgate and watch it classify new users",
        description="Start an embedded upstream, modelgate and a local image server; fill "
        "a users collection with digit images and labels; train a small CNN from a query "
        "(needs the train extra: pip install 'modelgate[train]'); attach it deferred and "
        "inline; insert new users through pymongo and print their predicted labels. Takes "
        "a minute or two on two CPU cores.",
    )
    from proxy.demo import add_arguments as add_demo_arguments

    add_demo_arguments(demo)
    demo.set_defaults(handler=_demo)
    # `bench` hands its arguments to bench/__main__.py untouched (see main()).
    commands.add_parser("bench", help="run a benchmark (modelgate bench --help lists them)")
    return parser


def _onnxruntime_missing() -> str | None:
    """What to install when no onnxruntime build is (fully) installed: the base install
    leaves the choice between the CPU and the GPU build to the user."""
    try:
        import onnxruntime  # noqa: F401
    except ImportError as exc:
        return (
            f"modelgate needs onnxruntime, which cannot be imported ({exc}). Install one "
            "build: pip install 'modelgate[cpu]' for the CPU, or pip install "
            "'modelgate[gpu]' for NVIDIA GPUs (onnxruntime-gpu with CUDA and cuDNN)."
        )
    return None


def main(argv: Sequence[str] | None = None) -> int:
    missing = _onnxruntime_missing()
    if missing is not None:
        print(f"modelgate: error: {missing}", file=sys.stderr)
        return 2
    arguments = list(sys.argv[1:] if argv is None else argv)
    if arguments[:1] == ["bench"]:
        from bench.__main__ import main as bench_main

        return bench_main(arguments[1:])
    parser = build_parser()
    args = parser.parse_args(arguments)
    return int(args.handler(args))


if __name__ == "__main__":
    sys.exit(main())
