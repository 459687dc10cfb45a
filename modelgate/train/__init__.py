"""Training an image classifier from a query on a collection, and attaching it.

    trainer = ImageClassifierTrainer(
        model, labels=[str(d) for d in range(10)], preprocess=PREPROCESS,
        client=client, collection=db.users, filter={"label": {"$exists": 1}},
        input_field="img", label_field="label",
    )
    trainer.fit(epochs=5)                      # -> metrics (validation accuracy, ...)
    trainer.predict("img", select={"label": {"$exists": 0}}, watch=True)

The documents are streamed in chunks; images referenced by URL come through the same
`engine.fetch.Fetcher` and `engine.cache.ImageCache` as serving, and with a preprocess
document they are turned into tensors by `preprocess_image_bytes`, the function serving
uses, so the model sees the same numbers at training time as behind the proxy. The
train/validation split is a hash of each `_id`, so it is the same on every run and a
document never changes side as the collection grows.

One module per concern: `errors`, `split`, `inputs` (image to model input), `dataset`
(what is read and what is skipped), `loading` (the bridge to the trio-based fetcher),
`loop` (training), `export` (ONNX, checked against torch) and `trainer`, which composes
them. torch is an optional extra (`pip install 'modelgate[train]'`), imported when a
trainer is created."""

from modelgate.admin import wait_for_backfill
from modelgate.train.dataset import LoadReport
from modelgate.train.errors import (
    ImageFetchError,
    OnnxMismatchError,
    TrainingError,
    TrainingWarning,
)
from modelgate.train.export import check_onnx_agreement
from modelgate.train.split import is_validation
from modelgate.train.trainer import ImageClassifierTrainer

__all__ = [
    "ImageClassifierTrainer",
    "ImageFetchError",
    "LoadReport",
    "OnnxMismatchError",
    "TrainingError",
    "TrainingWarning",
    "check_onnx_agreement",
    "is_validation",
    "wait_for_backfill",
]
