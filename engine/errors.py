"""The engine's error types. Each carries MongoDB's error code and codeName so that the
proxy can turn it into a `{ok: 0, code, codeName, errmsg}` reply without guessing."""

from __future__ import annotations


class ModelgateError(Exception):
    """Root of every error that modelgate reports to a client."""

    code: int = 1
    code_name: str = "InternalError"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def to_reply(self) -> dict[str, object]:
        return {"ok": 0.0, "errmsg": self.message, "code": self.code, "codeName": self.code_name}


class BadValue(ModelgateError):
    code = 2
    code_name = "BadValue"


class FailedToParse(ModelgateError):
    code = 9
    code_name = "FailedToParse"


class TypeMismatch(ModelgateError):
    code = 14
    code_name = "TypeMismatch"


class Unauthorized(ModelgateError):
    code = 13
    code_name = "Unauthorized"


class NamespaceNotFound(ModelgateError):
    code = 26
    code_name = "NamespaceNotFound"


class ModelNotFound(ModelgateError):
    # MongoDB has no "model" concept; NoSuchKey is the closest existing code.
    code = 4
    code_name = "NoSuchKey"


class InvalidModel(ModelgateError):
    """The ONNX bytes cannot be loaded, or do not fit the declared pre/postprocess."""

    code = 2
    code_name = "BadValue"


class PredictionError(ModelgateError):
    """One document could not be predicted (bad input, failed fetch, runtime error).

    Carried per document: inline `reject` turns it into a write error, `record` stores it."""

    code = 2
    code_name = "BadValue"
