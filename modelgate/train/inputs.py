"""How an image becomes the model's input at training time.

With a preprocess document (preferred), training calls `preprocess_image_bytes`, the
function serving uses, so the model sees the same numbers at training time as behind the
proxy. With a callable (torchvision transforms), the serving preprocess document is
checked against it on the first images read: they must give the model the same input."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from engine.errors import ModelgateError
from engine.inputs.image import decode_image, preprocess_image_bytes
from engine.spec import ImagePreprocess, ModelSpec
from modelgate.train.errors import TrainingError

__all__ = ["SERVING_CHECKS", "TrainingInput"]

# Images on which a training transform is compared with the serving preprocess document.
SERVING_CHECKS = 16
# Largest difference allowed between the two paths: far below one 8-bit pixel step.
_SERVING_TOLERANCE = 1e-4


class TrainingInput:
    """`preprocess` is a preprocess document or a callable from a PIL image to a tensor;
    `serving_preprocess` is, with a callable, the document serving will use."""

    def __init__(
        self,
        preprocess: Mapping[str, Any] | Callable[[Any], Any],
        serving_preprocess: Mapping[str, Any] | None = None,
    ) -> None:
        self._transform: Callable[[Any], Any] | None = None
        self._image_pre: ImagePreprocess | None = None
        self._serving_pre: ImagePreprocess | None = None
        #: The preprocess document to register; None when only a transform is known.
        self.document: dict[str, Any] | None = None
        if isinstance(preprocess, Mapping):
            self.document = dict(preprocess)
            self._image_pre = _image_preprocess(preprocess)
        elif callable(preprocess):
            self._transform = preprocess
            if serving_preprocess:
                self.document = dict(serving_preprocess)
                self._serving_pre = _image_preprocess(serving_preprocess)
        else:
            raise TrainingError("preprocess must be a preprocess document or a callable")

    @property
    def item_shape(self) -> tuple[int, ...] | None:
        """The shape of one image's input, when a preprocess document declares it."""
        declared = self._image_pre or self._serving_pre
        return tuple(declared.item_shape) if declared else None

    @property
    def checks_serving(self) -> bool:
        """Whether images must be compared with the serving preprocess (a transform)."""
        return self._serving_pre is not None

    def tensor(self, data: bytes) -> np.ndarray:
        """One image's bytes as the model input item."""
        if self._image_pre is not None:
            return preprocess_image_bytes(data, self._image_pre)
        assert self._transform is not None
        image = decode_image(data)
        try:
            out = self._transform(image)
        finally:
            image.close()
        return np.asarray(out.numpy() if hasattr(out, "numpy") else out, dtype=np.float32)

    def check_serving(self, document_id: Any, data: bytes, trained: np.ndarray) -> None:
        """The training transform and serving_preprocess must give the model the same
        input, or the registered model would see other numbers than it was trained on."""
        assert self._serving_pre is not None
        served = preprocess_image_bytes(data, self._serving_pre)
        if served.shape != trained.shape:
            raise TrainingError(
                f"the transform gives shape {list(trained.shape)} but serving_preprocess "
                f"{list(served.shape)} (document {document_id!r})"
            )
        difference = float(np.max(np.abs(served - trained)))
        if not difference <= _SERVING_TOLERANCE:
            raise TrainingError(
                f"the transform and serving_preprocess disagree on document {document_id!r} "
                f"(largest difference {difference:.4g}): serving would not see what "
                "training saw; make serving_preprocess describe the transform"
            )


def _image_preprocess(document: Mapping[str, Any]) -> ImagePreprocess:
    """Parse a preprocess document exactly as registerModel will."""
    try:
        spec = ModelSpec.from_document(
            {"name": "train", "collection": "a.b", "input": "x", "preprocess": dict(document)}
        )
    except ModelgateError as exc:
        raise TrainingError(f"invalid preprocess document: {exc.message}") from exc
    if not isinstance(spec.preprocess, ImagePreprocess):
        raise TrainingError("preprocess must be an image preprocess document (kind: 'image')")
    return spec.preprocess
