"""The engine's error types, and the one table of MongoDB error codes modelgate uses.

Each error carries MongoDB's code and codeName, so that the proxy can turn it into a
`{ok: 0, code, codeName, errmsg}` reply (proxy.replies.error_reply) without guessing and
drivers raise their usual exceptions."""

from __future__ import annotations

__all__ = [
    "MONGODB_CODES",
    "BSONObjectTooLarge",
    "BadValue",
    "DocumentValidationFailure",
    "FailedToParse",
    "HostUnreachable",
    "ImageFetchError",
    "IndexAlreadyExists",
    "IndexNotFound",
    "InvalidModel",
    "ModelNotFound",
    "ModelgateError",
    "NamespaceNotFound",
    "PredictionError",
    "TypeMismatch",
    "Unauthorized",
    "first_exception",
]

#: MongoDB's codes (src/mongo/base/error_codes.yml) for the codeNames modelgate replies with.
MONGODB_CODES: dict[str, int] = {
    "InternalError": 1,
    "UnknownError": 8,
    "BadValue": 2,
    "NoSuchKey": 4,
    "HostUnreachable": 6,
    "FailedToParse": 9,
    "Unauthorized": 13,
    "TypeMismatch": 14,
    "NamespaceNotFound": 26,
    "IndexNotFound": 27,
    "IndexAlreadyExists": 68,
    "DocumentValidationFailure": 121,
    "BSONObjectTooLarge": 10334,
}


class ModelgateError(Exception):
    """Root of every error that modelgate reports to a client."""

    code_name: str = "InternalError"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    @property
    def code(self) -> int:
        return MONGODB_CODES[self.code_name]


class BadValue(ModelgateError):
    code_name = "BadValue"


class FailedToParse(ModelgateError):
    code_name = "FailedToParse"


class TypeMismatch(ModelgateError):
    code_name = "TypeMismatch"


class Unauthorized(ModelgateError):
    code_name = "Unauthorized"


class NamespaceNotFound(ModelgateError):
    code_name = "NamespaceNotFound"


class IndexNotFound(ModelgateError):
    """No search index of that name or id on the collection."""

    code_name = "IndexNotFound"


class IndexAlreadyExists(ModelgateError):
    """A search index of that name already exists on the collection."""

    code_name = "IndexAlreadyExists"


class HostUnreachable(ModelgateError):
    """The upstream refused or went away in the middle of modelgate's own work."""

    code_name = "HostUnreachable"


class DocumentValidationFailure(ModelgateError):
    """A document refused before it is stored: the code MongoDB gives a document that
    fails schema validation, which is what an inline model's `reject` is."""

    code_name = "DocumentValidationFailure"


class BSONObjectTooLarge(ModelgateError):
    """A document over the upstream's maxBsonObjectSize (once its predictions are in)."""

    code_name = "BSONObjectTooLarge"


class ModelNotFound(ModelgateError):
    # MongoDB has no "model" concept; NoSuchKey is the closest existing code.
    code_name = "NoSuchKey"


class InvalidModel(ModelgateError):
    """The ONNX bytes cannot be loaded, or do not fit the declared pre/postprocess."""

    code_name = "BadValue"


class PredictionError(ModelgateError):
    """One document could not be predicted (bad input, failed fetch, runtime error).

    Carried per document: inline `reject` turns it into a write error, `record` stores it."""

    code_name = "BadValue"


class ImageFetchError(PredictionError):
    """An image URL could not be fetched (engine/fetch.py): told apart from a bad input
    so that the metrics can say which of the two failed."""


def first_exception(error: BaseException) -> BaseException:
    """The first exception inside a (possibly nested) exception group, or `error` itself:
    what a log line or an error message names when a nursery wrapped what went wrong."""
    while isinstance(error, BaseExceptionGroup):
        error = error.exceptions[0]
    return error
