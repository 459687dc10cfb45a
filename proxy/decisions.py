"""What a write or aggregate interceptor decides for a request (proxy.session runs it):
forward it as it came, forward a rewritten message, answer it here, or forward it in
parts (proxy.split_writes)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from proxy.replies import ReplyHook
from proxy.split_writes import ForwardInParts
from proxy.wire.opmsg import OpMsg

__all__ = ["AnswerLocally", "ForwardRewritten", "ForwardUnchanged", "WriteDecision"]


@dataclass(frozen=True)
class ForwardUnchanged:
    """Forward the client's message as it came. The hook, if any, sees (and may change)
    the upstream's reply, e.g. to learn that the write was acknowledged."""

    reply_hook: ReplyHook | None = None


@dataclass(frozen=True)
class ForwardRewritten:
    """Forward `message` in place of the client's; the hook, if any, turns the
    upstream's reply into the one the client expects."""

    message: OpMsg
    reply_hook: ReplyHook | None = None


@dataclass(frozen=True)
class AnswerLocally:
    """Forward nothing and answer the client with `reply`."""

    reply: dict[str, Any]


WriteDecision = ForwardUnchanged | ForwardRewritten | AnswerLocally | ForwardInParts
