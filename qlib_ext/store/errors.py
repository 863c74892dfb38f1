"""MongoDB error codes the store replies with, and the command-level exception carrying them."""

from __future__ import annotations

from typing import Any

CODE_NAMES = {
    1: "InternalError", 2: "BadValue", 9: "FailedToParse", 11000: "DuplicateKey",
    13: "Unauthorized", 15: "Overflow", 10334: "BSONObjectTooLarge", 18: "AuthenticationFailed",
    20: "IllegalOperation", 26: "NamespaceNotFound", 27: "IndexNotFound", 43: "CursorNotFound",
    48: "NamespaceExists", 59: "CommandNotFound", 66: "ImmutableField", 67: "CannotCreateIndex",
    73: "InvalidNamespace", 85: "IndexOptionsConflict", 86: "IndexKeySpecsConflict",
    238: "NotImplemented",
}


class CommandError(Exception):
    """A command failed; becomes ``{ok: 0, code, codeName, errmsg}`` (pymongo: OperationFailure)."""

    def __init__(self, code: int, message: str):
        super().__init__(message)
        self.code = code


def error_reply(code: int, message: str, **extra: Any) -> dict[str, Any]:
    """A MongoDB command error reply."""
    return {"ok": 0.0, "errmsg": message, "code": code, "codeName": CODE_NAMES.get(code, "Error"), **extra}
