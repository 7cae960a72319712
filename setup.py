"""Packaging metadata lives in pyproject.toml; this file only adds one build step.

The shipped recipes live at the top of the repository (`recipes/*.yaml`), where users browse and copy them.
Wheels carry them inside the package, as `lowrank_cli/recipes/shipped/*.yaml`, so `lowrank recipe ls` and
`lowrank run NAME` find them after any install (`lowrank_cli/recipes/shipped.py` looks there first, then in
the source checkout's `recipes/`).
"""

from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

RECIPES = Path(__file__).parent / "recipes"


class BuildWithRecipes(build_py):
    def run(self) -> None:
        super().run()
        target = Path(self.build_lib, "lowrank_cli", "recipes", "shipped")
        self.mkpath(str(target))
        for recipe in sorted(RECIPES.glob("*.yaml")):
            self.copy_file(str(recipe), str(target / recipe.name))

    def get_outputs(self, include_bytecode: bool = True) -> list[str]:
        shipped = Path(self.build_lib, "lowrank_cli", "recipes", "shipped")
        return [*super().get_outputs(include_bytecode), *(str(shipped / r.name) for r in RECIPES.glob("*.yaml"))]


setup(cmdclass={"build_py": BuildWithRecipes})
