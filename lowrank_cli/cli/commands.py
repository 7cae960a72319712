"""Typer commands generated from the jobs' options dataclasses (`lowrank_cli/api/jobs.py`).

Each field becomes one parameter with the field's flags, help, panel, default and bounds (MODEL first,
--json last); nothing is listed by hand, so a field added to an options dataclass is a flag at once. The
command builds the options object from what click parsed (text fields such as '1%' parsed by the field's
own parser) and runs the library function through the runner, recording sys.argv in the manifest.
"""

from __future__ import annotations

import inspect
import sys
from collections.abc import Callable
from typing import Annotated, Any

import typer

from lowrank_cli.api.jobs import JSON_SPEC, Job
from lowrank_cli.api.options.fields import OptionSpec
from lowrank_cli.cli.runner import run
from lowrank_cli.io.manifest import recording_command_line

__all__ = ["job_command", "SPECS_ATTRIBUTE"]

SPECS_ATTRIBUTE = "command_specs"  # the generated function carries its specs (what --config checks against)


def _annotation(spec: OptionSpec) -> Any:
    kind: Any = list[spec.base] if spec.is_list else spec.base
    if spec.default is None and not spec.required:
        kind = kind | None
    if spec.is_argument:
        return Annotated[kind, typer.Argument(help=spec.help, show_default=False)]
    decls = (f"{spec.flags[0]}/{spec.off_flag}", *spec.flags[1:]) if spec.off_flag else spec.flags
    return Annotated[kind, typer.Option(*decls, help=spec.help, rich_help_panel=spec.panel,
                                        show_default=spec.show_default, min=spec.minimum, max=spec.maximum)]


def _parameter(spec: OptionSpec) -> inspect.Parameter:
    default = inspect.Parameter.empty if spec.required else spec.default
    return inspect.Parameter(spec.param, inspect.Parameter.KEYWORD_ONLY, default=default,
                             annotation=_annotation(spec))


def job_command(job: Job, help: str | None = None) -> Callable[..., None]:
    """The function Typer registers for `lowrank JOB`: its signature is generated from the job's specs."""
    specs = job.specs()

    def command(**given: Any) -> None:
        json_mode = bool(given.pop(JSON_SPEC.param, False))
        model = given.pop("model", None)

        def work(progress):
            options = job.make_options(given)
            with recording_command_line(sys.argv):
                return job.run(model, options, progress)

        run(job.name, work, json_mode=json_mode)

    command.__signature__ = inspect.Signature([_parameter(s) for s in specs])  # type: ignore[attr-defined]
    command.__name__ = command.__qualname__ = f"{job.name.replace('-', '_')}_command"
    command.__doc__ = help or job.options.__doc__
    setattr(command, SPECS_ATTRIBUTE, specs)
    return command
