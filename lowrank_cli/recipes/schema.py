"""One strict schema per job, generated from its options dataclass (`lowrank_cli/api/jobs.py`).

Nothing is listed by hand: a job registered in `JOBS`, or a field added to its options, is picked up by
recipes and `--config` at once (and by the command line: `lowrank_cli/cli/commands.py` reads the same specs).
  - keys are the long flag names with underscores (`--target-ppl-increase` -> `target_ppl_increase`); MODEL
    is `model`; a second long flag is an alias (`--eval-data`);
  - types, defaults, bounds and help come from the fields and their metadata (`api/options/fields.py`);
  - the pydantic model is strict (`1.5` is no integer, `"yes"` no boolean) and forbids unknown keys.
Text options also take YAML numbers (`target_ppl_increase: 0.01`, `max_shard_size: 2GB` vs `2`), since on
the command line every value is text anyway.
"""

from __future__ import annotations

import difflib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lowrank_cli.api.jobs import JOBS
from lowrank_cli.api.options.fields import OptionSpec

__all__ = ["OptionSpec", "CommandSpec", "command_specs", "canonical_keys", "check_values", "suggest", "Problem"]


@dataclass
class CommandSpec:
    name: str
    options: dict[str, OptionSpec]  # by key, in the command's order
    _model: Any = field(default=None, repr=False)

    @classmethod
    def of(cls, name: str, specs: list[OptionSpec]) -> CommandSpec:
        return cls(name=name, options={s.key: s for s in specs})

    def key_for(self, name: str) -> str | None:
        """The canonical key for a key or one of its aliases."""
        if name in self.options:
            return name
        return next((o.key for o in self.options.values() if name in o.aliases), None)

    def by_flag(self, flag: str) -> tuple[OptionSpec, bool] | None:
        """(option, value for a bare switch) for `--flag` / `-f` / `--no-flag`."""
        for spec in self.options.values():
            if flag in spec.flags:
                return spec, True
            if flag == spec.off_flag:
                return spec, False
        return None

    def defaults(self) -> dict[str, Any]:
        return {k: o.default for k, o in self.options.items() if not o.required}

    def model(self):
        """The strict pydantic model (built on first use: pydantic is not imported for `--help`)."""
        if self._model is None:
            self._model = _build_model(self)
        return self._model


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a recipe or config, at a dotted location."""

    where: str
    message: str

    def __str__(self) -> str:
        return f"{self.where}: {self.message}" if self.where else self.message


def suggest(word: str, candidates) -> str:
    close = difflib.get_close_matches(word, list(candidates), n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


def command_specs() -> dict[str, CommandSpec]:
    """The spec of every job, by command name."""
    return {name: CommandSpec.of(name, job.specs()) for name, job in JOBS.items()}


# ---------------------------------------------------------------------------------------------------------
# the pydantic model


def _number_to_text(value):
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    if isinstance(value, Path):
        return str(value)
    return value


def _one_to_list(value):
    return [value] if value is not None and not isinstance(value, (list, tuple)) else value


def _field_type(spec: OptionSpec):
    from pydantic import BeforeValidator, Field

    base = spec.base
    if base is bool:
        kind = bool
    elif base is int or base is float:
        bounds = {k: v for k, v in (("ge", spec.minimum), ("le", spec.maximum)) if v is not None}
        kind = typing.Annotated[base, Field(**bounds)] if bounds else base
    else:  # str, Path and anything typer parses from text
        kind = typing.Annotated[str, BeforeValidator(_number_to_text)]
    if spec.is_list:
        kind = typing.Annotated[list[kind], BeforeValidator(_one_to_list)]
    if spec.default is None and not spec.required:
        kind = kind | None
    return kind


def _build_model(spec: CommandSpec):
    from pydantic import ConfigDict, Field, create_model

    fields = {}
    for i, (key, opt) in enumerate(spec.options.items()):
        # neutral field names: a flag may be called --json or --schema, which pydantic reserves
        fields[f"f{i}"] = (_field_type(opt), Field(... if opt.required else opt.default, alias=key))
    return create_model(f"{spec.name.replace('-', '_')}_options",
                        __config__=ConfigDict(strict=True, extra="forbid", populate_by_name=False), **fields)


def _describe(error: dict, spec: CommandSpec) -> str:
    kind, value = error["type"], error.get("input")
    if kind == "missing":
        return "is required"
    if kind == "literal_error":
        return f"must be one of {error['ctx']['expected']}, got {value!r}"
    names = {"int_type": "an integer", "int_from_float": "an integer", "float_type": "a number",
             "bool_type": "true or false", "string_type": "a string", "list_type": "a list"}
    if kind in names:
        return f"expected {names[kind]}, got {value!r}"
    return f"{error['msg'][0].lower()}{error['msg'][1:]}, got {value!r}"


def canonical_keys(spec: CommandSpec, values: dict[str, Any], where: str = "",
                   exclude: dict[str, str] | None = None) -> tuple[dict[str, Any], list[Problem]]:
    """Keys or aliases -> canonical keys; unknown keys (with a suggestion) and keys not allowed here
    (`exclude` maps them to the reason) are problems."""
    exclude = exclude or {}
    prefix = f"{where}." if where else ""
    problems: list[Problem] = []
    canonical: dict[str, Any] = {}
    for name, value in values.items():
        key = spec.key_for(str(name))
        if key is None:
            hint = suggest(str(name), [*spec.options, *(a for o in spec.options.values() for a in o.aliases)])
            problems.append(Problem(f"{prefix}{name}", f"unknown option for '{spec.name}'{hint}"))
        elif key in exclude:
            problems.append(Problem(f"{prefix}{name}", exclude[key]))
        elif key in canonical:
            problems.append(Problem(f"{prefix}{name}", f"given twice (as '{key}' and an alias)"))
        else:
            canonical[key] = value
    return canonical, problems


def check_values(spec: CommandSpec, values: dict[str, Any], where: str = "") -> tuple[dict[str, Any], list[Problem]]:
    """Validate canonical `values` against the strict schema: (every option resolved, problems)."""
    from pydantic import ValidationError

    prefix = f"{where}." if where else ""
    try:
        return spec.model().model_validate(values).model_dump(by_alias=True), []
    except ValidationError as exc:
        return {}, [Problem(f"{prefix}{'.'.join(str(p) for p in e['loc'])}", _describe(e, spec))
                    for e in exc.errors()]
