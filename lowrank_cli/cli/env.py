"""`lowrank env`."""

from __future__ import annotations

from lowrank_cli.cli import options as opt
from lowrank_cli.cli.runner import run

EPILOG = """\
[bold]Examples[/bold]

  lowrank env
  lowrank env --json > env.json     # attach to a bug report
"""


def env_command(json_out: opt.JSON = False) -> None:
    """Print versions (lowrank, Python, torch with CUDA, transformers, peft, accelerate) and devices."""

    def job(progress):
        from lowrank_cli.api.env import environment

        return environment()

    run("env", job, json_mode=json_out)
