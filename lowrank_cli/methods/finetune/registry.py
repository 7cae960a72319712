"""Method name -> method module (attach / optimizer / save, see spec.py), imported on first use."""

from __future__ import annotations

import importlib

from lowrank_cli.errors import UsageError
from lowrank_cli.methods.finetune.spec import METHODS

__all__ = ["get_method", "available_methods", "MODULES"]

MODULES = {"lora": "lora", "lora-pro": "lora_pro", "bone": "bone", "loldu": "loldu"}
assert set(MODULES) == set(METHODS)


def get_method(name: str):
    """The module implementing `name`; UsageError for an unknown or missing method."""
    if name not in MODULES:
        raise UsageError(f"unknown --method '{name}' (choose {', '.join(METHODS)})")
    try:
        module = importlib.import_module(f"lowrank_cli.methods.finetune.{MODULES[name]}")
    except ModuleNotFoundError as exc:
        if exc.name and exc.name.endswith(MODULES[name]):
            raise UsageError(f"--method {name} is not available in this installation") from exc
        raise
    missing = [f for f in ("attach", "optimizer", "save") if not callable(getattr(module, f, None))]
    if missing:
        raise UsageError(f"--method {name}: its module lacks {', '.join(missing)}")
    return module


def available_methods() -> list[str]:
    """Methods whose module imports (a method still being written is left out)."""
    found = []
    for name in METHODS:
        try:
            get_method(name)
        except UsageError:
            continue
        found.append(name)
    return found
