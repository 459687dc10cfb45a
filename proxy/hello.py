"""Rewriting the upstream's hello reply so that drivers see a mongos.

A driver that sees `msg: "isdbgrid"` treats modelgate as a router: it never learns the
replica-set members behind it, so it never connects around the proxy, and several
modelgate processes can share one seed list as mongos routers do. The upstream's limits
and wire versions are kept: they are what the upstream will accept."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from proxy.wire.compression import SUPPORTED_COMPRESSORS

__all__ = ["HELLO_COMMANDS", "rewrite_hello_reply"]

HELLO_COMMANDS = frozenset({"hello", "isMaster", "ismaster"})

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
