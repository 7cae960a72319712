"""The root `lowrank` command. Heavy libraries (torch, transformers) are imported inside the commands,
so `lowrank --help` answers in well under a second."""

from __future__ import annotations

import sys
from typing import Annotated

import typer

from lowrank_cli import __version__
from lowrank_cli.api.jobs import JOBS
from lowrank_cli.cli import compress as compress_cmd
from lowrank_cli.cli import decompose as decompose_cmd
from lowrank_cli.cli import env as env_cmd
from lowrank_cli.cli import eval as eval_cmd
from lowrank_cli.cli import finetune as finetune_cmd
from lowrank_cli.cli import merge as merge_cmd
from lowrank_cli.cli import quantize as quantize_cmd
from lowrank_cli.cli import recipe as recipe_cmd
from lowrank_cli.cli import run as run_cmd
from lowrank_cli.cli import trp as trp_cmd
from lowrank_cli.cli.commands import job_command
from lowrank_cli.cli.config_option import ConfigGroup
from lowrank_cli.cli.runner import STATE, json_error

__all__ = ["app", "main"]

EPILOG = """\
[bold]Examples[/bold]

  lowrank compress demo --target-ppl-increase 5% -o out/demo-small   # smallest model within +5%
  lowrank eval demo                                     # perplexity of the bundled demo model
  lowrank decompose demo --target-ppl-increase 5% -o out/demo-lord
  lowrank decompose bigcode/starcoder --target-ppl-increase 1% -o out/starcoder-lord --device cuda

[bold]Exit codes[/bold]: 0 ok, 1 runtime failure, 2 bad usage/input/config, 3 quality budget not met.
"""

app = typer.Typer(
    name="lowrank",
    help="Make Hugging Face language models smaller and cheaper with low-rank methods.",
    epilog=EPILOG,
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
    rich_markup_mode="rich",
    add_completion=True,
    context_settings={"help_option_names": ["-h", "--help"]},
    cls=ConfigGroup,  # every command takes --config FILE
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"lowrank {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    verbose: Annotated[int, typer.Option("--verbose", "-v", count=True,
                                         help="More detail on stderr: per-layer lines, tracebacks.")] = 0,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Warnings and errors only, no bars.")] = False,
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                          help="Print the version and exit.")] = False,
) -> None:
    """Make Hugging Face language models smaller and cheaper with low-rank methods."""
    STATE.verbose, STATE.quiet = verbose, quiet


# help text and examples of each job's command (a job without an entry gets its options' docstring)
TEXTS = {"eval": eval_cmd, "decompose": decompose_cmd, "env": env_cmd, "finetune": finetune_cmd,
         "quantize": quantize_cmd, "compress": compress_cmd, "merge": merge_cmd, "trp-train": trp_cmd}

for _job in JOBS.values():
    _text = TEXTS.get(_job.name)
    app.command(_job.name, epilog=getattr(_text, "EPILOG", None))(job_command(_job, getattr(_text, "HELP", None)))
app.command("run", epilog=run_cmd.EPILOG, context_settings=run_cmd.CONTEXT)(run_cmd.run_command)
app.add_typer(recipe_cmd.recipe_app, name="recipe")

def main() -> None:
    """Entry point. Click's own usage errors (unknown option, bad value) exit 2; with --json they also
    print the JSON error object, so pipelines always get one JSON document."""
    try:  # typer >= 0.29 vendors click as typer._click
        from typer._click import exceptions as click_errors
    except ImportError:  # pragma: no cover - older typer
        from click import exceptions as click_errors

    try:
        result = app(standalone_mode=False)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except click_errors.ClickException as exc:
        command = sys.argv[1] if len(sys.argv) > 1 else ""
        if "--json" in sys.argv:
            json_error(command, "usage", exc.format_message(), exc.exit_code)
        exc.show()
        sys.exit(exc.exit_code)
    except (KeyboardInterrupt, typer.Abort):
        sys.stderr.write("error: interrupted\n")
        sys.exit(130)
    sys.exit(result if isinstance(result, int) else 0)
