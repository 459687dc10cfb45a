"""Rewriting the upstream's hello reply so that drivers see a mongos.

A driver that sees `msg: "isdbgrid"` treats modelgate as a router: it never learns the
replica-set members behind it, so it never connects around the proxy, and several
modelgate processes can share one seed list as mongos routers do. The upstream's limits
and wire versions are kept: they are what the upstream will accept."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from proxy.replies import ReplyHook, decode_document
from proxy.wire.compression import SUPPORTED_COMPRESSORS

__all__ = [
    "HELLO_COMMANDS",
    "UpstreamLimits",
    "hello_reply_hook",
    "limits_from_hello",
    "rewrite_hello_reply",
]

HELLO_COMMANDS = frozenset({"hello", "isMaster", "ismaster"})


@dataclass(frozen=True)
class UpstreamLimits:
    """What the upstream accepts, from its hello reply; MongoDB's values until one came.
    A write that predictions enlarge is split or refused to stay within them
    (proxy.split_writes), since the upstream closes the connection over a message larger
    than it takes."""

    max_bson_object_size: int = 16 * 1024 * 1024
    max_message_size_bytes: int = 48_000_000
    max_write_batch_size: int = 100_000


def limits_from_hello(reply: dict[str, Any], known: UpstreamLimits) -> UpstreamLimits:
    """The limits a hello reply states; those it leaves out (an error reply) stay `known`."""

    def limit(field: str, default: int) -> int:
        value = reply.get(field)
        return int(value) if isinstance(value, int | float) and value > 0 else default

    return UpstreamLimits(
        limit("maxBsonObjectSize", known.max_bson_object_size),
        limit("maxMessageSizeBytes", known.max_message_size_bytes),
        limit("maxWriteBatchSize", known.max_write_batch_size),
    )


# Fields that describe a replica set (or a standalone) and that a mongos never sends.
_REPLICA_SET_FIELDS = (
    "setName",
    "setVersion",
    "hosts",
    "passives",
    "arbiters",
    "primary",
    "me",
    "secondary",
    "arbiterOnly",
    "hidden",
    "tags",
    "electionId",
    "lastWrite",
    "isreplicaset",
)


def rewrite_hello_reply(reply: dict[str, Any], offered: Sequence[str]) -> dict[str, Any]:
    """The hello reply a mongos would send in place of `reply`. Errors pass unchanged.

    Compression is negotiated on the proxy's own account: it agrees to whatever the
    client `offered` that it can decompress, whatever the upstream takes, and compresses
    the replies itself where the upstream does not take the client's compressor."""
    if not reply.get("ok"):
        return reply
    rewritten = {key: value for key, value in reply.items() if key not in _REPLICA_SET_FIELDS}
    rewritten["msg"] = "isdbgrid"
    agreed = [name for name in offered if name in SUPPORTED_COMPRESSORS]
    if agreed:
        rewritten["compression"] = agreed
    else:
        rewritten.pop("compression", None)
    return rewritten


def hello_reply_hook(request_body: bytes, learn: Callable[[dict[str, Any]], None]) -> ReplyHook:
    """The hook that rewrites the reply to the hello `request_body` (for the compressors
    the client offered in it), after `learn` has seen the upstream's own reply."""
    offered = decode_document(request_body).get("compression")
    offered_names = [name for name in offered if isinstance(name, str)] if offered else []

    def hook(reply: dict[str, Any]) -> dict[str, Any]:
        learn(reply)
        return rewrite_hello_reply(reply, offered_names)

    return hook
