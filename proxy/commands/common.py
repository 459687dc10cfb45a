"""What the admin commands share: argument hygiene and the authorization check."""

from __future__ import annotations

from typing import Any

from engine.errors import BadValue, TypeMismatch, Unauthorized
from engine.models import ModelSet
from proxy.session import CommandContext

__all__ = ["command_fields", "models_of", "require_admin_db", "require_db_admin", "string_arg"]

# Fields drivers add to every command; they are not the command's own arguments.
_GENERIC_FIELDS = frozenset(
    {
        "lsid",
        "txnNumber",
        "autocommit",
        "startTransaction",
        "apiVersion",
        "apiStrict",
        "apiDeprecationErrors",
        "comment",
        "maxTimeMS",
        "writeConcern",
        "readConcern",
    }
)

# Roles that may administer a database (MongoDB's built-in roles).
_ANY_DATABASE_ROLES = frozenset({"root", "dbAdminAnyDatabase", "__system"})
_DATABASE_ROLES = frozenset({"dbAdmin", "dbOwner"})


def command_fields(command: dict[str, Any]) -> dict[str, Any]:
    return {
        key: value
        for key, value in command.items()
        if not key.startswith("$") and key not in _GENERIC_FIELDS
    }


def require_admin_db(name: str, command: dict[str, Any]) -> None:
    if command.get("$db") != "admin":
        raise Unauthorized(f"{name} may only be run against the admin database.")


def string_arg(name: str, command: dict[str, Any]) -> str:
    value = command.get(name)
    if not isinstance(value, str):
        raise TypeMismatch(f"{name} takes a model name (a string), got {type(value).__name__}")
    if not value:
        raise BadValue(f"{name} needs a model name")
    return value


def models_of(context: CommandContext) -> ModelSet:
    models = context.models
    if models is None:
        raise BadValue("this modelgate process serves no models")
    return models


async def require_db_admin(context: CommandContext, command: str, database: str) -> None:
    """Only a user allowed to administer `database` may change its models.

    Asked on the client's own upstream connection, so it is the client's authentication
    that counts. An upstream without access control lets everyone through, as it would
    let everyone drop the collection."""
    status = await context.upstream_command({"connectionStatus": 1, "$db": "admin"})
    auth_info = status.get("authInfo") or {}
    if not auth_info.get("authenticatedUsers"):
        probe = await context.upstream_command(
            {"listDatabases": 1, "nameOnly": True, "$db": "admin"}
        )
        if probe.get("ok"):
            return
        raise Unauthorized(f"command {command} requires authentication")
    for role in auth_info.get("authenticatedUserRoles") or []:
        if role.get("role") in _ANY_DATABASE_ROLES:
            return
        if role.get("role") in _DATABASE_ROLES and role.get("db") == database:
            return
    users = ", ".join(f"{u.get('user')}@{u.get('db')}" for u in auth_info["authenticatedUsers"])
    raise Unauthorized(f"not authorized on {database} to execute command {command} (as {users})")
