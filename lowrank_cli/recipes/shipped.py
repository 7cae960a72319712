"""The shipped recipes: `recipes/*.yaml` at the top of the repository, where users browse and copy them.

Wheels carry them inside the package as `lowrank_cli/recipes/shipped/*.yaml` (a build step in setup.py);
a source checkout or an editable install reads the repository's folder. A recipe argument is a file path
first; failing that, the name of a shipped recipe, with or without `.yaml` (`lowrank run demo` works from
any folder).
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

__all__ = ["shipped", "locate", "header_command", "recipes_folder"]


def recipes_folder() -> Path | None:
    """Where the shipped recipes are: inside the installed package, else the source checkout's recipes/."""
    packaged = Path(str(resources.files("lowrank_cli.recipes"))) / "shipped"
    if packaged.is_dir():
        return packaged
    checkout = Path(__file__).resolve().parents[2] / "recipes"
    return checkout if checkout.is_dir() else None


def shipped() -> dict[str, Path]:
    """Name -> path of every shipped recipe, sorted by name."""
    folder = recipes_folder()
    found = {p.stem: p for p in folder.glob("*.yaml")} if folder is not None else {}
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
