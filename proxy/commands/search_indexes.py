"""The search index commands drivers send: createSearchIndexes, updateSearchIndex and
dropSearchIndex (pymongo's create_search_index / update_search_index /
drop_search_index, mongosh's createSearchIndex / updateSearchIndex / dropSearchIndex),
run on the collection's database and answered from modelgate's catalog
(engine.search.catalog) with MongoDB's replies:

  {createSearchIndexes: coll, indexes: [{name: "default", type, definition}, ...]}
      -> {ok: 1, indexesCreated: [{id, name}, ...]}
  {updateSearchIndex: coll, name | id, definition}  -> {ok: 1}
  {dropSearchIndex: coll, name | id}                -> {ok: 1}

(`$listSearchIndexes` is an aggregation stage: proxy.vector_search answers it.)

Only vectorSearch indexes are served. With --search passthrough the proxy has no
catalog, and these commands go to the upstream unchanged, for an upstream that has search
of its own (Atlas, mongot). Changing a database's search indexes takes the right to
administer that database (as changing its models does)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from engine.errors import (
    BadValue,
    IndexAlreadyExists,
    IndexNotFound,
    NamespaceNotFound,
    TypeMismatch,
)
from engine.registry import DATABASE
from engine.search.catalog import SearchCatalog
from engine.search.definitions import (
    SearchIndexDefinition,
    check_index_name,
    index_type,
)
from proxy.commands.common import command_fields, require_db_admin
from proxy.session import CommandContext

__all__ = ["SEARCH_INDEX_COMMANDS", "create", "drop", "search_catalog_of", "update"]

#: The commands this module answers (forwarded to the upstream with --search passthrough).
SEARCH_INDEX_COMMANDS = frozenset({"createSearchIndexes", "updateSearchIndex", "dropSearchIndex"})
# Databases whose collections take no search index (MongoDB's own, and modelgate's).
_RESERVED_DATABASES = frozenset({"admin", "local", "config", DATABASE})
_ENTRY_FIELDS = frozenset({"name", "type", "definition"})


def search_catalog_of(context: CommandContext) -> SearchCatalog | None:
    """The proxy's search index catalog (`context.search_catalog`), or None when the
    upstream serves search itself (--search passthrough)."""
    return context.search_catalog


async def create(context: CommandContext, command: dict[str, Any]) -> dict[str, Any]:
    call = _call(context, command, "createSearchIndexes", {"indexes"})
    if call is None:
        return await context.upstream_command(command)
    catalog, fields, db, namespace = call
    entries = _entries(fields.get("indexes"))
    await require_db_admin(context, "createSearchIndexes", db)
    for name, _ in entries:
        if catalog.get(namespace, name) is not None:
            raise IndexAlreadyExists(
                f"Duplicate Index: a search index named '{name}' already exists on {namespace}"
            )
    created = []
    for name, definition in entries:
        index = await catalog.create(namespace, name, definition)
        created.append({"id": index.id, "name": index.name})
        context.log.info("created search index '%s' on %s", name, namespace)
    return {"ok": 1.0, "indexesCreated": created}


async def update(context: CommandContext, command: dict[str, Any]) -> dict[str, Any]:
    call = _call(context, command, "updateSearchIndex", {"name", "id", "definition"})
    if call is None:
        return await context.upstream_command(command)
    catalog, fields, db, namespace = call
    name, index_id = _name_or_id("updateSearchIndex", fields)
    if "definition" not in fields:
        raise BadValue("updateSearchIndex: 'definition' is required")
    definition = fields["definition"]
    if not isinstance(definition, Mapping):
        raise TypeMismatch(f"'definition' must be a document, got {type(definition).__name__}")
    await require_db_admin(context, "updateSearchIndex", db)
    index = await catalog.update(namespace, name, definition, index_id=index_id)
    context.log.info("updated search index '%s' on %s (v%d)", index.name, namespace, index.version)
    return {"ok": 1.0}


async def drop(context: CommandContext, command: dict[str, Any]) -> dict[str, Any]:
    call = _call(context, command, "dropSearchIndex", {"name", "id"})
    if call is None:
        return await context.upstream_command(command)
    catalog, fields, db, namespace = call
    name, index_id = _name_or_id("dropSearchIndex", fields)
    await require_db_admin(context, "dropSearchIndex", db)
    try:
        dropped = await catalog.drop(namespace, name, index_id=index_id)
    except IndexNotFound:
        # As MongoDB: no collection, NamespaceNotFound (which drivers ignore on drop).
        if not await _collection_exists(context, db, namespace.split(".", 1)[1]):
            raise NamespaceNotFound(f"collection {namespace} does not exist") from None
        raise
    context.log.info("dropped search index '%s' on %s", dropped, namespace)
    return {"ok": 1.0}


# --------------------------------------------------------------------------- arguments


def _call(
    context: CommandContext, command: dict[str, Any], command_name: str, allowed: set[str]
) -> tuple[SearchCatalog, dict[str, Any], str, str] | None:
    """(catalog, the command's own fields, database, namespace), checked; None when the
    upstream serves search itself (the command goes there as it came)."""
    catalog = search_catalog_of(context)
    if catalog is None:
        return None
    fields = command_fields(command)
    for key in fields:
        if key != command_name and key not in allowed:
            raise BadValue(f"{command_name}: unknown field '{key}'")
    db, namespace = _namespace(command_name, command)
    return catalog, fields, db, namespace


def _namespace(command_name: str, command: Mapping[str, Any]) -> tuple[str, str]:
    collection = command.get(command_name)
    if not isinstance(collection, str):
        raise TypeMismatch(
            f"{command_name} takes a collection name (a string), got {type(collection).__name__}"
        )
    if not collection or "\x00" in collection or collection.startswith("$"):
        raise BadValue(f"{command_name}: invalid collection name {collection!r}")
    db = command.get("$db")
    if not isinstance(db, str) or not db:
        raise BadValue(f"{command_name} needs a database ($db)")
    if db in _RESERVED_DATABASES:
        raise BadValue(f"{command_name}: search indexes cannot be created in database '{db}'")
    return db, f"{db}.{collection}"


def _entries(value: Any) -> list[tuple[str, Mapping[str, Any]]]:
    """The (name, definition) of each index to create, all validated before any is."""
    if value is None:
        raise BadValue("createSearchIndexes: 'indexes' is required")
    if not isinstance(value, list):
        raise TypeMismatch(f"'indexes' must be an array, got {type(value).__name__}")
    if not value:
        raise BadValue("createSearchIndexes: 'indexes' may not be empty")
    entries: list[tuple[str, Mapping[str, Any]]] = []
    for i, entry in enumerate(value):
        if not isinstance(entry, Mapping):
            raise TypeMismatch(f"'indexes.{i}' must be a document, got {type(entry).__name__}")
        for key in entry:
            if key not in _ENTRY_FIELDS:
                raise BadValue(f"'indexes.{i}': unknown field '{key}'")
        if "definition" not in entry:
            raise BadValue(f"'indexes.{i}.definition' is required")
        index_type(entry)
        name = check_index_name(entry.get("name", "default"))
        if any(name == seen for seen, _ in entries):
            raise IndexAlreadyExists(f"Duplicate Index: '{name}' is named twice in 'indexes'")
        SearchIndexDefinition.from_document(entry["definition"], index_name=name)
        entries.append((name, entry["definition"]))
    return entries


def _name_or_id(command_name: str, fields: Mapping[str, Any]) -> tuple[str | None, str | None]:
    name, index_id = fields.get("name"), fields.get("id")
    if (name is None) == (index_id is None):
        raise BadValue(f"{command_name} takes either 'name' or 'id' (one of them)")
    if index_id is not None and not isinstance(index_id, str):
        raise TypeMismatch(f"'id' must be a string, got {type(index_id).__name__}")
    return (check_index_name(name) if name is not None else None), index_id


async def _collection_exists(context: CommandContext, db: str, collection: str) -> bool:
    reply = await context.upstream_command(
        {"listCollections": 1, "filter": {"name": collection}, "nameOnly": True, "$db": db}
    )
    if not reply.get("ok"):
        return True  # not ours to tell: the index is what was not found
    return bool(reply.get("cursor", {}).get("firstBatch"))
