"""Inline predictions: writes to a namespace with inline models get their predictions
before they are forwarded, so the upstream's acknowledgement covers them.

insert, update (upserts, replacements, and operator updates that set the input field),
findAndModify and the bulkWrite command are handled. A document the model cannot
predict is stored with an error record (onError "record") or refused with a write error
(onError "reject"); refusals keep MongoDB's ordered/unordered semantics: an ordered
write stops at the first refused statement, an unordered one goes on, and every
writeErrors index in the reply is the client's own.

Until the upstream has answered the process's first read of its model registry, writes
wait for it: a write let through before could miss a model registered earlier."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from time import perf_counter_ns
from typing import Any, Protocol

import bson
import trio
from bson.raw_bson import RawBSONDocument

from engine.batching import Failure, ModelServer, Outcome
from engine.documents import (
    FAITHFUL,
    MISSING,
    array_on_path,
    get_path,
    path_touches,
    set_path,
    through_array_message,
)
from engine.errors import DocumentValidationFailure, HostUnreachable, ModelgateError
from engine.inputs import ImageSource
from engine.outputs import error_record, stale_update
from engine.raw_documents import read_path, write_path
from proxy.hello import UpstreamLimits
from proxy.replies import error_reply
from proxy.session import (
    AnswerLocally,
    CommandContext,
    ForwardRewritten,
    ForwardUnchanged,
    WriteDecision,
)
from proxy.split_writes import (
    fits_in_one,
    merge_bulk_write_replies,
    merge_hook,
    split_bulk_write,
    split_write,
    statement_limit,
    too_large,
)
from proxy.wire.opmsg import DocumentSequence, OpMsg

__all__ = ["InlineWrites", "ServedModels"]

WRITE_COMMANDS = frozenset({"insert", "update", "findAndModify", "findandmodify", "bulkWrite"})
# How long a write waits for the upstream to answer the first read of the model registry
# (it may be unreachable at start) before the write is refused: a driver's default server
# selection timeout, so that a client waits about as long as it would for MongoDB itself.
REGISTRY_WAIT_S = 30.0


class _Target:
    """One write statement whose new document may need a prediction: a document (an
    insert, a replacement) or an operator update (`mods`, with its query and upsert)."""

    __slots__ = ("changed", "document", "mods", "query", "statement", "upsert")

    def __init__(
        self,
        statement: int,
        document: dict[str, Any] | None,
        mods: dict[str, Any] | None = None,
        query: Any = None,
        upsert: bool = False,
    ) -> None:
        self.statement = statement
        self.document = document
        self.mods = mods
        self.query = query
        self.upsert = upsert
        self.changed = False  # whether an output was stored in it

    def locate(self, field: str) -> tuple[Any, str | None]:
        """The statement's input for `field` (or MISSING), and for an operator update the
        operator its output goes into."""
        if self.document is not None:
            return get_path(self.document, field), None
        assert self.mods is not None
        return _operator_input(self.mods, self.query, self.upsert, field)

    def store(self, out: str, operator: str | None, value: Any) -> None:
        self.changed = True
        if self.document is not None:
            set_path(self.document, out, value)
        else:
            assert self.mods is not None
            self.mods.setdefault(operator or "$set", {})[out] = value


def _document_target(statement: int, document: dict[str, Any]) -> _Target:
    return _Target(statement, document)


def _update_target(statement: int, mods: Any, query: Any, upsert: bool) -> _Target | None:
    """An update's target: a replacement document is a document; an operator update
    counts when it sets the input field ($set, or $setOnInsert and the query's equality
    on an upsert), and the output goes into the same operator. Pipelines are left alone."""
    if not isinstance(mods, dict) or not mods:
        return None
    if not next(iter(mods)).startswith("$"):
        return _document_target(statement, mods)
    return _Target(statement, None, mods, query, upsert)


def _operator_input(mods: dict[str, Any], query: Any, upsert: bool, field: str) -> tuple[Any, str]:
    operators = ("$set", "$setOnInsert") if upsert else ("$set",)
    for operator in operators:
        fields = mods.get(operator)
        if not isinstance(fields, dict):
            continue
        for key, value in fields.items():
            if key == field:
                return value, operator
            if field.startswith(key + ".") and isinstance(value, dict):
                nested = get_path(value, field[len(key) + 1 :])
                if nested is not MISSING:
                    return nested, operator
    if upsert and isinstance(query, dict):
        value = query.get(field, MISSING)
        if value is not MISSING and not (
            isinstance(value, dict) and any(str(k).startswith("$") for k in value)
        ):
            return value, "$setOnInsert"
    return MISSING, "$set"


def _mark_stale(mods: Any, input_field: str, output_field: str) -> bool:
    """An operator update that changes a deferred model's input makes its output stale
    in the same write (engine.outputs.stale_update, as backfillModel does), so the
    document is pending again even where no change stream reports the update.
    Replacements need nothing: they drop the output themselves."""
    if not isinstance(mods, dict) or not mods or not next(iter(mods)).startswith("$"):
        return False
    touched = [key for fields in mods.values() if isinstance(fields, dict) for key in fields]
    if not any(path_touches(key, input_field) for key in touched) or any(
        path_touches(key, output_field) for key in touched
    ):
        return False
    for operator, fields in stale_update(output_field).items():
        mods.setdefault(operator, {}).update(fields)
    return True


def _unsets_input(mods: Any, field: str) -> bool:
    unset = mods.get("$unset") if isinstance(mods, dict) else None
    return isinstance(unset, dict) and any(path_touches(key, field) for key in unset)


class ServedModels(Protocol):
    """What the interceptor reads of the models served (engine.models.ModelSet)."""

    @property
    def image_source(self) -> ImageSource | None: ...

    @property
    def registry_answered(self) -> bool: ...

    async def wait_until_answered(self) -> None: ...

    @property
    def has_inline(self) -> bool: ...

    @property
    def has_deferred(self) -> bool: ...

    def inline_for(self, namespace: str) -> list[ModelServer]: ...

    def deferred_for(self, namespace: str) -> list[ModelServer]: ...

    def has_deferred_on(self, namespace: str) -> bool: ...


class InlineWrites:
    """The session's WriteInterceptor: inline predictions, and a nudge to the deferred
    workers of the namespace once the upstream has acknowledged a write."""

    def __init__(
        self, models: ServedModels, on_written: Callable[[str], None] | None = None
    ) -> None:
        self.models = models
        self.on_written = on_written

    def wants(self, command: str) -> bool:
        return command in WRITE_COMMANDS and (
            self.models.has_inline or self.models.has_deferred or not self.models.registry_answered
        )

    async def intercept(
        self, context: CommandContext, command: str, message: OpMsg
    ) -> WriteDecision:
        if not self.models.registry_answered and not await self._registry_answered():
            return AnswerLocally(error_reply(HostUnreachable(
                f"the upstream has not answered modelgate's read of its model registry in"
                f" {REGISTRY_WAIT_S:g} s (modelgate's log says why), so modelgate cannot tell"
                f" which models this {command} needs; nothing was written"
            )))  # fmt: skip
        body = bson.decode(message.body, codec_options=FAITHFUL)
        if command == "bulkWrite":
            ns_info, _ = _statements(body, message, "nsInfo")
            namespaces = [str(info.get("ns")) for info in ns_info]
            decision = await self._bulk_write(context, body, message, namespaces)
        else:
            namespaces = [f"{body.get('$db')}.{body.get(command)}"]
            servers = self.models.inline_for(namespaces[0])
            deferred = self.models.deferred_for(namespaces[0])
            if command == "update" and (servers or deferred):
                decision = await self._update(context, body, message, servers, deferred)
            elif not servers:
                decision = ForwardUnchanged()
            elif command == "insert":
                decision = await self._insert(context, body, message, servers)
            else:
                decision = await self._find_and_modify(context, body, servers)
        return self._notify_deferred(decision, namespaces)

    async def _registry_answered(self) -> bool:
        with trio.move_on_after(REGISTRY_WAIT_S):
            await self.models.wait_until_answered()
        return self.models.registry_answered

    def _notify_deferred(self, decision: WriteDecision, namespaces: list[str]) -> WriteDecision:
        """A forwarded write to a namespace with deferred models nudges their workers once
        the upstream has acknowledged it."""
        deferred = [ns for ns in namespaces if self.models.has_deferred_on(ns)]
        if not deferred or self.on_written is None or isinstance(decision, AnswerLocally):
            return decision
        notify = self.on_written
        inner = decision.reply_hook

        def hook(reply: dict[str, Any]) -> dict[str, Any]:
            for namespace in deferred:
                notify(namespace)
            return inner(reply) if inner is not None else reply

        return dataclasses.replace(decision, reply_hook=hook)

    # -- the commands --------------------------------------------------------------------

    async def _insert(
        self,
        context: CommandContext,
        body: dict[str, Any],
        message: OpMsg,
        servers: list[ModelServer],
    ) -> WriteDecision:
        if not message.sequences and not all(
            isinstance(document, dict) for document in body.get("documents") or ()
        ):
            return ForwardUnchanged()  # not documents: the upstream refuses the insert
        raws, in_sequence = _raw_statements(body, message, "documents")
        refusals = await self._predict_raw(context, servers, raws)
        return _rebuild(
            body, message, "documents", raws.__getitem__, len(raws), in_sequence, refusals,
            context.limits,
        )  # fmt: skip

    async def _update(
        self,
        context: CommandContext,
        body: dict[str, Any],
        message: OpMsg,
        servers: list[ModelServer],
        deferred: list[ModelServer],
    ) -> WriteDecision:
        updates, in_sequence = _statements(body, message, "updates")
        targets = []
        stale = False
        for i, update in enumerate(updates):
            mods = update.get("u")
            for server in servers:
                if isinstance(mods, dict) and _unsets_input(mods, server.model.spec.input_field):
                    mods.setdefault("$unset", {})[server.model.spec.output_field] = ""
            for server in deferred:
                stale |= _mark_stale(
                    mods, server.model.spec.input_field, server.model.spec.output_field
                )
            target = _update_target(i, mods, update.get("q"), bool(update.get("upsert")))
            if target is not None and servers:
                targets.append(target)
        if not targets and not stale:
            return ForwardUnchanged()
        refusals = await self._predict(context, servers, targets)
        return _rebuild(
            body, message, "updates", _encoder(updates), len(updates), in_sequence, refusals,
            context.limits,
        )  # fmt: skip

    async def _find_and_modify(
        self, context: CommandContext, body: dict[str, Any], servers: list[ModelServer]
    ) -> WriteDecision:
        upsert = bool(body.get("upsert"))
        target = _update_target(0, body.get("update"), body.get("query"), upsert)
        if body.get("remove") or target is None:
            return ForwardUnchanged()
        refusals = await self._predict(context, servers, [target])
        if refusals:
            return AnswerLocally(error_reply(refusals[0]))
        encoded = bson.encode(body, codec_options=FAITHFUL)
        oversized = too_large(encoded, "update", context.limits)
        if oversized is not None:
            return AnswerLocally(error_reply(oversized))
        return ForwardRewritten(OpMsg(0, encoded))

    async def _bulk_write(
        self,
        context: CommandContext,
        body: dict[str, Any],
        message: OpMsg,
        namespaces: list[str],
    ) -> WriteDecision:
        ops, in_sequence = _statements(body, message, "ops")
        refusals: dict[int, ModelgateError] = {}
        touched = False
        for namespace_index, namespace in enumerate(namespaces):
            servers = self.models.inline_for(str(namespace))
            if not servers:
                continue
            touched = True
            targets = []
            for i, op in enumerate(ops):
                if op.get("insert") == namespace_index and isinstance(op.get("document"), dict):
                    targets.append(_document_target(i, op["document"]))
                elif op.get("update") == namespace_index:
                    target = _update_target(
                        i, op.get("updateMods"), op.get("filter"), bool(op.get("upsert"))
                    )
                    if target is not None:
                        targets.append(target)
            refusals.update(await self._predict(context, servers, targets))
        if not touched:
            return ForwardUnchanged()
        return _rebuild(
            body, message, "ops", _encoder(ops), len(ops), in_sequence, refusals, context.limits,
            bulk=True,
        )  # fmt: skip

    async def _predict(
        self, context: CommandContext, servers: list[ModelServer], targets: list[_Target]
    ) -> dict[int, ModelgateError]:
        """Run every model over its targets, in registration order (so a model may read
        an earlier one's output). Returns the refused statements and why."""
        refusals: dict[int, ModelgateError] = {}
        for server in servers:
            spec = server.model.spec
            field, out = spec.input_field, spec.output_field
            located = []
            # A document whose input path goes through an array: get_path sees no value
            # there, MongoDB's queries see one per element; it fails rather than pass.
            unusable: list[tuple[_Target, str | None, Failure]] = []
            for target in targets:
                if target.statement in refusals:
                    continue
                value, operator = target.locate(field)
                if value is not MISSING:
                    located.append((target, value, operator))
                elif target.document is not None:
                    through = array_on_path(target.document, field)
                    if through is not None:
                        failure = Failure(through_array_message(field, through))
                        unusable.append((target, operator, failure))
            if not located and not unusable:
                continue
            outcomes = await self._run(context, server, [value for _, value, _ in located])
            predicted = [
                (target, operator, outcome)
                for (target, _, operator), outcome in zip(located, outcomes, strict=True)
            ]
            for target, operator, outcome in predicted + unusable:
                stored = _settle(server, outcome)
                if isinstance(stored, ModelgateError):
                    refusals[target.statement] = stored
                else:
                    target.store(out, operator, stored)
            if refusals:
                context.log.info("refused %d statements for model '%s'", len(refusals), spec.name)
        return refusals

    async def _predict_raw(
        self, context: CommandContext, servers: list[ModelServer], raws: list[bytes]
    ) -> dict[int, ModelgateError]:
        """_predict for the documents of an insert, kept as BSON: each model's output is
        written into its document's bytes (engine.raw_documents), which are otherwise
        forwarded as the client sent them, never encoded again. Returns the refusals."""
        refusals: dict[int, ModelgateError] = {}
        for server in servers:
            spec = server.model.spec
            field, out = spec.input_field, spec.output_field
            indices: list[int] = []
            values: list[Any] = []
            unusable: list[tuple[int, Outcome]] = []
            for index, raw in enumerate(raws):
                if index in refusals:
                    continue
                value, through = read_path(raw, field)
                if value is not MISSING:
                    indices.append(index)
                    values.append(value)
                elif through is not None:
                    # get_path sees no value there, MongoDB's queries see one per element.
                    unusable.append((index, Failure(through_array_message(field, through))))
            if not indices and not unusable:
                continue
            outcomes = await self._run(context, server, values)
            for index, outcome in [*zip(indices, outcomes, strict=True), *unusable]:
                stored = _settle(server, outcome)
                if isinstance(stored, ModelgateError):
                    refusals[index] = stored
                else:
                    raws[index] = write_path(raws[index], out, stored)
            if refusals:
                context.log.info("refused %d statements for model '%s'", len(refusals), spec.name)
        return refusals

    async def _run(
        self, context: CommandContext, server: ModelServer, values: list[Any]
    ) -> list[Outcome]:
        if not values:
            return []
        started_ns = perf_counter_ns()
        outcomes = await server.predict_values(values, image_source=self.models.image_source)
        context.inference_ns += perf_counter_ns() - started_ns
        return outcomes


def _settle(server: ModelServer, outcome: Outcome) -> Any:
    """What a document stores for `outcome`: the prediction, or for a failure its error
    record (onError "record"), or the DocumentValidationFailure that refuses it."""
    if not isinstance(outcome, Failure):
        return outcome.value
    spec = server.model.spec
    if spec.on_error == "record":
        return error_record(outcome.message, server.version)
    return DocumentValidationFailure(
        f"model '{spec.name}' v{server.version} could not predict "
        f"'{spec.input_field}': {outcome.message}"
    )


def _statements(
    body: dict[str, Any], message: OpMsg, field: str
) -> tuple[list[dict[str, Any]], bool]:
    """The statements of a write, from its body or its document sequence."""
    for sequence in message.sequences:
        if sequence.identifier == field:
            return [bson.decode(doc, codec_options=FAITHFUL) for doc in sequence.documents], True
    value = body.get(field)
    return (list(value) if isinstance(value, list) else []), False


def _raw_statements(body: dict[str, Any], message: OpMsg, field: str) -> tuple[list[bytes], bool]:
    """_statements as BSON: a document sequence's documents as they came; those of the
    body, decoded with it, encoded again (FAITHFUL: the same bytes)."""
    for sequence in message.sequences:
        if sequence.identifier == field:
            return list(sequence.documents), True
    statements, _ = _statements(body, message, field)
    return [bson.encode(statement, codec_options=FAITHFUL) for statement in statements], False


def _encoder(statements: list[dict[str, Any]]) -> Callable[[int], bytes]:
    def encoded(index: int) -> bytes:
        return bson.encode(statements[index], codec_options=FAITHFUL)

    return encoded


def _rebuild(
    body: dict[str, Any],
    message: OpMsg,
    field: str,
    encoded_statement: Callable[[int], bytes],
    count: int,
    in_sequence: bool,
    refusals: dict[int, ModelgateError],
    limits: UpstreamLimits,
    *,
    bulk: bool = False,
) -> WriteDecision:
    """The write to forward without the refused statements (those the models refused,
    and those their predictions made too large for the upstream), and the reply hook that
    puts the refusals back into the upstream's reply at the client's indices. A write
    that no longer fits one upstream message goes in parts (proxy.split_writes).
    `encoded_statement(i)`: the BSON of the client's statement i, as it is to be sent."""
    ordered = body.get("ordered", True) is not False
    # An ordered write stops at its first refusal: nothing after it is sent or checked.
    end = min(refusals) if ordered and refusals else count
    encoded: dict[int, bytes] = {}
    limit = statement_limit(field, limits)
    for i in range(end):
        if i in refusals:
            continue
        data = encoded_statement(i)
        oversized = too_large(data, field, limits) if len(data) > limit else None
        if oversized is None:
            encoded[i] = data
            continue
        refusals[i] = oversized
        if ordered:
            break
    if ordered and refusals:
        first = min(refusals)
        refusals = {first: refusals[first]}
    kept = list(encoded)
    errors = [_write_error(i, error, bulk) for i, error in sorted(refusals.items())]
    if not kept and bulk:
        return AnswerLocally(merge_bulk_write_replies([{"ok": 1.0}], [[]], errors, ordered))
    if not kept:
        return AnswerLocally(_empty_reply(body, errors))
    sequences = tuple(s for s in message.sequences if s.identifier != field)
    if in_sequence:
        sequences = (*sequences, DocumentSequence(field, tuple(encoded.values())))
    else:
        body[field] = [RawBSONDocument(data) for data in encoded.values()]
    if bulk and errors:
        # Every result in the first batch, where the hook puts back the client's indices.
        body.pop("cursor", None)
    forwarded = OpMsg(message.flags, bson.encode(body, codec_options=FAITHFUL), sequences)
    if fits_in_one(forwarded, len(kept), limits):
        hook = merge_hook(kept, errors, ordered, bulk=bulk) if errors else None
        return ForwardRewritten(forwarded, hook)
    parts = list(encoded.items())
    if bulk:
        return split_bulk_write(body, message, parts, count, errors, limits)
    return split_write(body, message, field, parts, count, errors, limits)


def _write_error(index: int, refused: ModelgateError, bulk: bool) -> dict[str, Any]:
    key = "idx" if bulk else "index"
    error = {key: index, "code": refused.code, "codeName": refused.code_name}
    error["errmsg"] = refused.message
    return {"ok": 0.0, **error, "n": 0} if bulk else error


def _empty_reply(body: dict[str, Any], errors: list[dict[str, Any]]) -> dict[str, Any]:
    reply: dict[str, Any] = {"n": 0, "writeErrors": errors, "ok": 1.0}
    if "updates" in body or body.get("update"):
        reply["nModified"] = 0
    return reply
