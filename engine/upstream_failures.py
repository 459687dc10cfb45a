"""pymongo's errors as the MongoDB-shaped errors modelgate replies with.

modelgate's own work on the upstream (the registry, the deferred queues) runs on
pymongo. When that work fails inside a client's command, the client gets a reply, never
a closed connection: a command the upstream refused keeps the upstream's code, codeName
and errmsg (as mongos passes a shard's error on); a lost or unreachable upstream is
HostUnreachable; anything else pymongo raises is an InternalError."""

from __future__ import annotations

import pymongo.errors

from engine.errors import MONGODB_CODES, HostUnreachable, ModelgateError

__all__ = ["UpstreamRefusal", "upstream_failure"]

_CODE_NAMES = {code: name for name, code in MONGODB_CODES.items()}


class UpstreamRefusal(ModelgateError):
    """The upstream refused one of modelgate's own commands: its code and codeName."""

    def __init__(self, message: str, *, code: int, code_name: str) -> None:
        super().__init__(message)
        self._code = code
        self.code_name = code_name

    @property
    def code(self) -> int:
        return self._code


def upstream_failure(exc: pymongo.errors.PyMongoError, doing: str) -> ModelgateError:
    """The error to reply with when `exc` interrupted modelgate while `doing` something
    (a phrase such as "storing model 'm'")."""
    if isinstance(exc, pymongo.errors.OperationFailure):
        details = exc.details or {}
        errmsg = details.get("errmsg") or (exc.args[0] if exc.args else str(exc))
        if exc.code is None:
            return ModelgateError(f"failed while {doing}: {errmsg}")
        # Replies without a codeName (write errors) get the one MongoDB gives codes
        # that have no name of their own.
        code_name = details.get("codeName") or _CODE_NAMES.get(exc.code, f"Location{exc.code}")
        return UpstreamRefusal(str(errmsg), code=exc.code, code_name=str(code_name))
    if isinstance(exc, pymongo.errors.ConnectionFailure):
        return HostUnreachable(f"the upstream did not answer while {doing}: {exc}")
    return ModelgateError(f"failed while {doing}: {exc}")
