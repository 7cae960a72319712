"""`EnvOptions`: `lowrank env` takes none; the class makes env a job like the others."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["EnvOptions"]


@dataclass
class EnvOptions:
    """`lowrank env` takes no options."""
