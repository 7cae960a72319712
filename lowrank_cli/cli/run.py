"""`lowrank run RECIPE.yaml`."""

from __future__ import annotations

from typing import Annotated

import typer

from lowrank_cli.cli import options as opt
from lowrank_cli.cli.runner import STATE, run

EPILOG = """\
[bold]Examples[/bold]

  lowrank run demo.yaml                                 # a shipped recipe (lowrank recipe ls)
  lowrank run my.yaml --dry-run                         # validate, print each step's command, dry-run them
  lowrank run my.yaml --set decompose.params_ratio=0.7 --set steps.1.eval.max_tokens=4096
  lowrank run my.yaml --device cuda                     # a flag after the recipe: every step that takes it
  lowrank run my.yaml --force --json > run.json         # redo every step; one JSON object for the run

[bold]Recipe[/bold]: `steps:` is a list of `- COMMAND: {options}`, options named as that command's flags
with underscores (`model` and `output` too). A step without `model` reads the latest earlier output.
Precedence: defaults < recipe < --set < flags. Steps whose output is complete with the same options are
skipped; each output folder gets the resolved recipe as recipe.yaml. The run stops at the first failing
step, with its exit code.
"""

CONTEXT = {"ignore_unknown_options": True}  # step flags after RECIPE reach STEP_FLAGS as text


def run_command(
    recipe: Annotated[str, typer.Argument(help="A recipe file, or the name of a shipped recipe "
                                               "(lowrank recipe ls).", show_default=False)],
    step_flags: Annotated[list[str] | None, typer.Argument(
        help="Explicit step flags (e.g. --device cuda): applied to every step whose command takes them; "
        "they win over the recipe and --set.", show_default=False, metavar="STEP_FLAGS")] = None,
    overrides: Annotated[list[str] | None, typer.Option(
        "--set", help="Override a recipe value: steps.N.key=v, COMMAND.key=v or key=v (YAML-typed value); "
        "repeatable.", show_default=False)] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Validate, print the plan, dry-run the steps "
                                          "that support it; write nothing.")] = False,
    force: Annotated[bool, typer.Option("--force", help="Redo steps whose output is already complete.")
                     ] = False,
    json_out: opt.JSON = False,
) -> None:
    """Run a recipe: a list of lowrank commands, each step's output feeding the next."""

    def job(progress):
        from lowrank_cli.recipes.execute import execute
        from lowrank_cli.recipes.recipe import load_plan

        plan = load_plan(recipe, sets=overrides or [], flags=step_flags or [])
        return execute(plan, dry_run=dry_run, force=force, json_mode=json_out, quiet=STATE.quiet,
                       progress=progress)

    run("run", job, json_mode=json_out)
