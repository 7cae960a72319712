"""The one option the hand-written commands (`run`, `recipe ...`) share with the generated ones: --json.
The jobs' options are their dataclasses' fields (`lowrank_cli/api/options/`)."""

from __future__ import annotations

from typing import Annotated

import typer

from lowrank_cli.api.jobs import JSON_SPEC

__all__ = ["JSON"]

JSON = Annotated[bool, typer.Option(*JSON_SPEC.flags, help=JSON_SPEC.help, rich_help_panel=JSON_SPEC.panel)]
