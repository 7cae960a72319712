"""Result objects returned by the library API and rendered by the CLI (human table or one JSON object)."""

from __future__ import annotations

import dataclasses
from typing import Any

__all__ = ["Result", "RESULT_SCHEMA"]

RESULT_SCHEMA = "lowrank.result/v1"


@dataclasses.dataclass
class Result:
    """Base: subclasses are dataclasses; `summary()` gives the rows a human sees."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def summary(self) -> list[tuple[str, Any]]:
        return [(k, v) for k, v in self.to_dict().items() if not isinstance(v, (dict, list))]
