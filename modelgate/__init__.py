"""modelgate's Python client: what runs in the user's own process.

It talks to a modelgate proxy over the wire, through any pymongo client pointed at it,
like any other client: export a torch module to ONNX, register, list, inspect, backfill
and drop models (`modelgate.admin`), and train an image classifier from a query on a
collection (`modelgate.train`, with the `train` extra)."""
