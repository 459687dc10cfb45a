"""The times the leases kept in MongoDB are written with: the deferred work's
(engine.leases) and the change streams' (engine.deferred_watch)."""

from __future__ import annotations

import datetime

__all__ = ["RELEASED", "utc_now"]

# The expiry a lease is released with: long past, so that no query for live leases
# counts it and any process takes it at once.
RELEASED = datetime.datetime(1970, 1, 1, tzinfo=datetime.UTC)


def utc_now() -> datetime.datetime:
    """Now, time zone aware: what lease expiries are set from and compared with."""
    return datetime.datetime.now(datetime.UTC)
