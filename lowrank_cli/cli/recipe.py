"""`lowrank recipe ls | show NAME | validate FILE`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated

import typer

from lowrank_cli.cli import options as opt
from lowrank_cli.cli.runner import run
from lowrank_cli.result import Result

EPILOG = """\
[bold]Examples[/bold]

  lowrank recipe ls
  lowrank recipe show demo > my.yaml                    # copy a shipped recipe to edit
  lowrank recipe show demo --resolved --set decompose.params_ratio=0.7
  lowrank recipe validate my.yaml --json
"""

recipe_app = typer.Typer(help="List, show and check recipes (YAML files that chain lowrank commands).",
                         epilog=EPILOG, no_args_is_help=True, rich_markup_mode="rich")

NAME = Annotated[str, typer.Argument(help="A recipe file, or the name of a shipped recipe.", show_default=False)]
SETS = Annotated[list[str] | None, typer.Option("--set", help="Override a value (as for `lowrank run`).",
                                                show_default=False)]


@dataclass
class RecipeList(Result):
    recipes: list = field(default_factory=list)

    def summary(self):
        return [(r["name"], f"{' -> '.join(r['steps'])}: {r['description'] or ''}") for r in self.recipes]


@dataclass
class RecipeText(Result):
    recipe: str
    text: str

    def render(self) -> None:
        typer.echo(self.text, nl=not self.text.endswith("\n"))


@dataclass
class Validation(Result):
    recipe: str
    valid: bool
    steps: list = field(default_factory=list)

    def summary(self):
        return [("recipe", f"{self.recipe}: valid, {len(self.steps)} steps")] + [
            (f"steps.{s['step']}", s["command_line"]) for s in self.steps]


@recipe_app.command("ls", epilog=EPILOG)
def ls_command(json_out: opt.JSON = False) -> None:
    """List the recipes shipped with lowrank."""

    def job(progress):
        import yaml

        from lowrank_cli.recipes.recipe import recipe_text
        from lowrank_cli.recipes.shipped import header_command, shipped

        found = []
        for name, path in shipped().items():
            text = recipe_text(path)
            doc = yaml.safe_load(text) or {}
            steps = [next(iter(s)) for s in doc.get("steps") or [] if isinstance(s, dict) and s]
            found.append({"name": name, "path": str(path), "steps": steps, "description": doc.get("description"),
                          "command": header_command(text)})
        return RecipeList(recipes=found)

    run("recipe ls", job, json_mode=json_out)


@recipe_app.command("show", epilog=EPILOG)
def show_command(
    name: NAME,
    resolved: Annotated[bool, typer.Option("--resolved", help="Print the validated recipe with every "
                                           "option and the chaining made explicit.")] = False,
    overrides: SETS = None,
    json_out: opt.JSON = False,
) -> None:
    """Print a recipe (with --resolved: after overrides, defaults and chaining)."""

    def job(progress):
        from lowrank_cli.recipes.recipe import RecipeInvalid, load_plan, recipe_text
        from lowrank_cli.recipes.schema import Problem
        from lowrank_cli.recipes.shipped import locate

        if resolved or overrides:
            import yaml

            plan = load_plan(name, sets=overrides or [])
            return RecipeText(recipe=plan.source, text=yaml.safe_dump(plan.document(), sort_keys=False))
        path = locate(name)
        if path is None:
            raise RecipeInvalid(name, [Problem("", "no such file, and no shipped recipe of that name "
                                                   "(see `lowrank recipe ls`)")])
        return RecipeText(recipe=str(path), text=recipe_text(path))

    run("recipe show", job, json_mode=json_out)


@recipe_app.command("validate", epilog=EPILOG)
def validate_command(file: NAME, overrides: SETS = None, json_out: opt.JSON = False) -> None:
    """Check a recipe against the registered commands: every problem at once (exit 2)."""

    def job(progress):
        from lowrank_cli.recipes.recipe import load_plan

        plan = load_plan(file, sets=overrides or [])
        return Validation(recipe=plan.source, valid=True, steps=[
            {"step": s.index, "command": s.command, "command_line": s.shell(), "model_from": s.model_from}
            for s in plan.steps])

    run("recipe validate", job, json_mode=json_out)
