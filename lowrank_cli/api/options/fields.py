"""How an options field looks on the command line and in recipes: the metadata `option()` attaches, and the
`OptionSpec` each field resolves to.

The CLI (`lowrank_cli/cli/commands.py`) builds a Typer command from the specs and recipes/`--config`
(`lowrank_cli/recipes/schema.py`) a strict pydantic model, so a field added to an options dataclass is a
flag and a recipe key at once. A field without metadata still is one: `--field-name`, no help text.

    output: str | None = option(None, help="Output folder.", flags=("--output", "-o"), panel=OUTPUT)

Keys are the first long flag with underscores (`--seq-len` -> `seq_len`, whatever the field is called);
further long flags are aliases. A field whose command-line form is text parsed into another type (a
percentage, a comma-separated list) names the conversion with `parse`: its flag and recipe key take text.
Nothing here imports torch, Typer or pydantic.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Callable
from dataclasses import MISSING, dataclass
from typing import Any

from lowrank_cli.errors import UsageError

__all__ = ["option", "OptionSpec", "option_specs", "argument_spec", "unwrap_annotation", "parse_fraction",
           "parse_patterns", "MODEL_PANEL", "DATA_PANEL", "OUTPUT_PANEL", "RUNTIME_PANEL", "TRAIN_PANEL",
           "CHECKPOINT_PANEL"]

META = "lowrank"
MODEL_PANEL, DATA_PANEL, OUTPUT_PANEL, RUNTIME_PANEL = "Model", "Data", "Output", "Runtime"
TRAIN_PANEL, CHECKPOINT_PANEL = "Training", "Checkpoints"


@dataclass(frozen=True)
class _Meta:
    help: str = ""
    flags: tuple[str, ...] = ()
    negatable: bool = False
    panel: str | None = None
    show_default: bool | None = None
    minimum: float | None = None
    maximum: float | None = None
    required: bool = False
    parse: Callable[[Any], Any] | None = None


def option(default: Any = MISSING, *, help: str = "", flags: tuple[str, ...] = (), negatable: bool = False,
           panel: str | None = None, show_default: bool | None = None, min: float | None = None,
           max: float | None = None, required: bool = False, parse: Callable[[Any], Any] | None = None) -> Any:
    """A dataclass field with its command-line form.

    flags: ("--output", "-o"); default `--field-name`. negatable: a switch with a `--no-x` form.
    show_default: None shows it unless it is None. required: the command line and recipes insist on it
    (the library checks it in `validate()`). parse: the flag takes text and `parse(text)` is the field's value
    (the library's callers pass the value itself).
    """
    meta = _Meta(help=help, flags=tuple(flags), negatable=negatable, panel=panel, show_default=show_default,
                 minimum=min, maximum=max, required=required, parse=parse)
    return dataclasses.field(default=default, metadata={META: meta})


@dataclass(frozen=True)
class OptionSpec:
    """One key of a command: a field of its options, its MODEL argument, or --json."""

    key: str  # recipe/config key
    param: str  # the Python name (the field, or the command function's parameter)
    flags: tuple[str, ...]  # ("--output", "-o"); () for a positional argument
    off_flag: str | None  # "--no-sequential"
    base: Any  # what the command line and recipes give: str, int, float or bool
    is_list: bool
    default: Any
    required: bool
    is_argument: bool = False
    help: str = ""
    panel: str | None = None
    show_default: bool = True
    minimum: float | None = None
    maximum: float | None = None
    aliases: tuple[str, ...] = ()
    parse: Callable[[Any], Any] | None = None

    @property
    def is_flag(self) -> bool:
        return self.base is bool and not self.is_argument

    @property
    def flag(self) -> str:
        return next((f for f in self.flags if f.startswith("--")), self.flags[0] if self.flags else self.key)

    def value(self, given: Any) -> Any:
        """The command-line/recipe value -> the field's value."""
        return self.parse(given) if self.parse is not None and given is not None else given


def unwrap_annotation(annotation: Any) -> tuple[Any, bool]:
    """X | None / list[X] -> (X, is_list)."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        annotation = args[0] if len(args) == 1 else str
    is_list = typing.get_origin(annotation) in (list, tuple)
    if is_list:
        annotation = next(iter(typing.get_args(annotation)), str)
    return annotation, is_list


def _field_spec(field: dataclasses.Field, annotation: Any) -> OptionSpec:
    meta = field.metadata.get(META) or _Meta()
    flags = meta.flags or (f"--{field.name.replace('_', '-')}",)
    longs = [f[2:].replace("-", "_") for f in flags if f.startswith("--")]
    base, is_list = (str, False) if meta.parse is not None else unwrap_annotation(annotation)
    default = field.default if field.default is not MISSING else (
        field.default_factory() if field.default_factory is not MISSING else None)
    show = meta.show_default if meta.show_default is not None else default is not None
    return OptionSpec(
        key=longs[0], param=field.name, flags=flags, base=base, is_list=is_list, default=default,
        off_flag=f"--no-{flags[0][2:]}" if meta.negatable else None, required=meta.required,
        help=meta.help, panel=meta.panel, show_default=show, minimum=meta.minimum, maximum=meta.maximum,
        aliases=tuple(longs[1:]), parse=meta.parse)


def option_specs(options_class: type) -> list[OptionSpec]:
    """The specs of an options dataclass, in field order."""
    hints = typing.get_type_hints(options_class)
    return [_field_spec(f, hints[f.name]) for f in dataclasses.fields(options_class) if f.init]


def argument_spec(name: str, help: str) -> OptionSpec:
    """A required positional argument (MODEL)."""
    return OptionSpec(key=name, param=name, flags=(), off_flag=None, base=str, is_list=False, default=None,
                      required=True, is_argument=True, help=help, show_default=False)


# -- conversions from command-line text ----------------------------------------------------------------


def parse_fraction(text: Any, flag: str = "value") -> float | None:
    """'1%' -> 0.01; '0.01' -> 0.01 (a bare number is a fraction)."""
    if text is None:
        return None
    raw = str(text).strip()
    try:
        return float(raw[:-1]) / 100 if raw.endswith("%") else float(raw)
    except ValueError:
        raise UsageError(f"{flag} takes a percentage like 1% or a fraction like 0.01, got '{text}'") from None


def parse_patterns(text: Any) -> list[str] | None:
    """'q_proj,*.mlp.*' -> ['q_proj', '*.mlp.*'] (the targets' own parser, imported when used)."""
    from lowrank_cli.methods.decompose.targets import parse_patterns as parse

    return parse(text)
