"""Rewriting the upstream's hello reply so that drivers see a mongos.

A driver that sees `msg: "isdbgrid"` treats modelgate as a router: it never learns the
replica-set members behind it, so it never connects around the proxy, and several
modelgate processes can share one seed list as mongos routers do. The upstream's limits
and wire versions are kept: they are what the upstream will accept."""

from __future__ import annotations

from typing import Any

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


def rewrite_hello_reply(reply: dict[str, Any]) -> dict[str, Any]:
    """The hello reply a mongos would send in place of `reply`. Errors pass unchanged."""
    if not reply.get("ok"):
        return reply
    rewritten = {key: value for key, value in reply.items() if key not in _REPLICA_SET_FIELDS}
    rewritten["msg"] = "isdbgrid"
    return rewritten
