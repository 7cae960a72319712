"""The recipes shipped inside the package (`lowrank_cli/recipes/*.yaml`, installed as package data).

A recipe argument is a file path first; failing that, the name of a shipped recipe, with or without
`.yaml` (`lowrank run demo` works from any folder once the package is installed).
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

__all__ = ["shipped", "locate", "header_command"]


def shipped() -> dict[str, Path]:
    """Name -> path of every shipped recipe, sorted by name."""
    folder = resources.files("lowrank_cli.recipes")
    found = {}
    for entry in folder.iterdir():
        if entry.name.endswith(".yaml"):
            found[entry.name[: -len(".yaml")]] = Path(str(entry))
    return dict(sorted(found.items()))


def locate(source: str | Path) -> Path | None:
    """A recipe file: the path itself if it exists, else the shipped recipe of that name."""
    path = Path(source).expanduser()
    if path.is_file():
        return path
    name = path.name[: -len(".yaml")] if path.name.endswith((".yaml", ".yml")) else path.name
    if str(source) in (name, f"{name}.yaml", f"{name}.yml"):  # a bare name, not a missing path
        return shipped().get(name)
    return None


def header_command(text: str) -> str | None:
    """The command a recipe's opening comment gives (`# lowrank run ...`)."""
    for line in text.splitlines():
        stripped = line.strip()
        if not stripped.startswith("#"):
            return None
        body = stripped.lstrip("#").strip()
        if body.startswith("lowrank "):
            return body.split("  #")[0].strip()
    return None
