"""Vector search served by modelgate on any MongoDB: MongoDB's search-index API
(definitions and their catalog in the `modelgate` database), autoEmbed's derived models,
and the local index each process keeps and rebuilds from MongoDB (derived data, like a
cache)."""
