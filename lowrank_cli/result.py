"""Result objects returned by the library API and rendered by the CLI (human table or one JSON object)."""

from __future__ import annotations

import dataclasses
from typing import Any

__all__ = ["Result", "RESULT_SCHEMA", "ok_document", "error_document"]

RESULT_SCHEMA = "lowrank.result/v1"


@dataclasses.dataclass
class Result:
    """Base: subclasses are dataclasses; `summary()` gives the rows a human sees."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def summary(self) -> list[tuple[str, Any]]:
        return [(k, v) for k, v in self.to_dict().items() if not isinstance(v, (dict, list))]


def ok_document(command: str, result: Result) -> dict[str, Any]:
    """The --json document of a job that succeeded (also each step's record in `lowrank run --json`)."""
    return {"schema": RESULT_SCHEMA, "command": command, "status": "ok", "exit_code": 0, **result.to_dict()}


def error_document(command: str, kind: str, message: str, code: int, hint: str | None = None) -> dict[str, Any]:
    """The --json document of a job that failed."""
    return {"schema": RESULT_SCHEMA, "command": command, "status": "error", "exit_code": code,
            "error": {"type": kind, "message": message, "hint": hint}}
