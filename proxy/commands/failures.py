"""The admin commands' error boundary: whatever fails inside a command becomes its
MongoDB-shaped reply (`{ok: 0, code, codeName, errmsg}`), never a closed connection.

The session replies with any ModelgateError. Here the rest become one: pymongo's errors
from modelgate's own upstream work (the registry, the deferred queues) as
engine.upstream_failures says, and anything unexpected as an InternalError with its
traceback in the log. Errors of the client's own connections pass through: the session
closes that connection, which is the network error drivers retry."""

from __future__ import annotations

from typing import Any

import pymongo.errors
import trio

from engine.errors import ModelgateError
from engine.upstream_failures import upstream_failure
from proxy.session import CommandContext, CommandHandler
from proxy.wire.errors import ProtocolError

__all__ = ["replying_on_failure"]

# What the session itself catches to end a connection (see Session.serve).
_CONNECTION_ERRORS = (ProtocolError, trio.BrokenResourceError, trio.ClosedResourceError, OSError)


def replying_on_failure(name: str, handler: CommandHandler) -> CommandHandler:
    """`handler`, raising only ModelgateError (and the connection's own errors)."""

    async def handle(context: CommandContext, command: dict[str, Any]) -> dict[str, Any]:
        try:
            return await handler(context, command)
        except (ModelgateError, *_CONNECTION_ERRORS):
            raise
        except pymongo.errors.PyMongoError as exc:
            raise upstream_failure(exc, f"running {name}") from exc
        except Exception as exc:
            context.log.exception("command %s failed unexpectedly", name)
            raise ModelgateError(
                f"{name} failed inside modelgate: {type(exc).__name__}: {exc}"
            ) from exc

    return handle
