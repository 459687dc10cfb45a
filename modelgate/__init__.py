"""modelgate's Python client: what runs in the user's own process.

It talks to a modelgate proxy over the wire, through any pymongo client pointed at it,
like any other client: export a torch module to ONNX, register, list, inspect, backfill,
retry and drop models (the helpers of `modelgate.admin`, exported here), export and register
a sentence-transformers text embedding model in one call (`modelgate.text`, exported here),
and train an image classifier from a query on a collection (`modelgate.train`, with the
`train` extra).
torch is imported only by the functions that need it, so `import modelgate` works
without it."""

# The helpers users call, re-exported here (`from modelgate import register_model`).
from modelgate.admin import backfill_model as backfill_model
from modelgate.admin import drop_model as drop_model
from modelgate.admin import export_onnx as export_onnx
from modelgate.admin import list_models as list_models
from modelgate.admin import model_status as model_status
from modelgate.admin import register_model as register_model
from modelgate.admin import retry_failed as retry_failed
from modelgate.admin import wait_for_backfill as wait_for_backfill
from modelgate.text import TextExportError as TextExportError
from modelgate.text import TextModelExport as TextModelExport
from modelgate.text import export_sentence_transformer as export_sentence_transformer
from modelgate.text import minilm_model_dir as minilm_model_dir
from modelgate.text import register_text_model as register_text_model
