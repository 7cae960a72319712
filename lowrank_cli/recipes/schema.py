"""One strict schema per registered command, derived from the command itself.

Nothing is listed by hand: a command registered in `lowrank_cli/cli/app.py`, or a flag added to one, is
picked up by recipes and `--config` at once. For each Typer command:
  - keys are the long flag names with underscores (`--target-ppl-increase` -> `target_ppl_increase`);
    positional arguments by their name (`model`); a second long flag is an alias (`--eval-data`);
  - types and defaults come from the function signature, bounds from the option's `min`/`max`, choices
    from Enum/Literal annotations;
  - the pydantic model is strict (`1.5` is no integer, `"yes"` no boolean) and forbids unknown keys.
String options also take YAML numbers (`target_ppl_increase: 0.01`, `max_shard_size: 2GB` vs `2`), since
on the command line every value is text anyway.
"""

from __future__ import annotations

import difflib
import enum
import inspect
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["OptionSpec", "CommandSpec", "command_spec", "command_specs", "root_command", "canonical_keys",
           "check_values", "suggest", "Problem", "CONFIG_KEY"]

CONFIG_KEY = "config"  # the generic --config option (lowrank_cli/recipes/config_option.py): never a key itself


@dataclass(frozen=True)
class OptionSpec:
    key: str  # recipe/config key
    param: str  # the Python parameter name the command function takes
    flags: tuple[str, ...]  # e.g. ("--output", "-o"); () for a positional argument
    off_flag: str | None  # "--no-sequential" for a --x/--no-x switch
    base: Any  # str, int, float, bool, Path, an Enum class or a Literal
    is_list: bool
    default: Any
    required: bool
    is_argument: bool
    is_flag: bool
    minimum: float | None = None
    maximum: float | None = None
    aliases: tuple[str, ...] = ()

    @property
    def choices(self) -> tuple | None:
        if isinstance(self.base, type) and issubclass(self.base, enum.Enum):
            return tuple(m.value for m in self.base)
        if typing.get_origin(self.base) is typing.Literal:
            return typing.get_args(self.base)
        return None

    @property
    def flag(self) -> str:
        return next((f for f in self.flags if f.startswith("--")), self.flags[0] if self.flags else self.key)


@dataclass
class CommandSpec:
    name: str
    options: dict[str, OptionSpec]  # by key, in signature order
    command: Any = field(default=None, repr=False)  # the click command
    _model: Any = field(default=None, repr=False)

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


# ---------------------------------------------------------------------------------------------------------
# from a Typer command to a spec


def _unwrap(annotation) -> tuple[Any, bool, bool]:
    """Annotated[X | None, ...] / list[X] -> (X, is_list, nullable)."""
    if typing.get_origin(annotation) is typing.Annotated:
        annotation = typing.get_args(annotation)[0]
    nullable = False
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        nullable = len(args) < len(typing.get_args(annotation))
        annotation = args[0] if len(args) == 1 else str
    is_list = typing.get_origin(annotation) in (list, tuple, set)
    if is_list:
        inner = [a for a in typing.get_args(annotation) if a is not Ellipsis]
        annotation = inner[0] if inner else str
    return annotation, is_list, nullable


def _signature(callback) -> dict[str, inspect.Parameter]:
    func = inspect.unwrap(callback)
    try:
        return dict(inspect.signature(func, eval_str=True).parameters)
    except (NameError, TypeError):  # an annotation that cannot be resolved: fall back to the raw one
        return dict(inspect.signature(func).parameters)


def command_spec(name: str, command) -> CommandSpec:
    """The spec of one click command built by Typer (its params + its function's signature)."""
    signature = _signature(command.callback) if command.callback else {}
    options: dict[str, OptionSpec] = {}
    for param in command.params:
        if not param.expose_value or param.name == CONFIG_KEY or getattr(param, "count", False):
            continue
        is_argument = getattr(param, "param_type_name", "") == "argument"
        longs = [f[2:].replace("-", "_") for f in param.opts if f.startswith("--")]
        key = param.name if is_argument or not longs else longs[0]
        sig = signature.get(param.name)
        annotation = sig.annotation if sig is not None and sig.annotation is not inspect.Parameter.empty \
            else getattr(getattr(param, "type_descriptor", None), "annotation", str)
        base, is_list, _ = _unwrap(annotation)
        default = param.default() if callable(param.default) else param.default
        if is_list and isinstance(default, tuple):
            default = list(default)
        options[key] = OptionSpec(
            key=key, param=param.name, flags=tuple(param.opts) if not is_argument else (),
            off_flag=(param.secondary_opts[0] if getattr(param, "secondary_opts", None) else None),
            base=base, is_list=is_list or param.multiple or param.nargs == -1, default=default,
            required=bool(param.required), is_argument=is_argument, is_flag=bool(getattr(param, "is_flag", False)),
            minimum=getattr(param, "min", None), maximum=getattr(param, "max", None), aliases=tuple(longs[1:]))
    return CommandSpec(name=name, options=options, command=command)


def root_command():
    """The live root click group when called inside a `lowrank` invocation, else one built from the app."""
    try:
        from typer._click.globals import get_current_context
    except ImportError:  # pragma: no cover - older typer
        from click import get_current_context
    ctx = get_current_context(silent=True)
    if ctx is not None and hasattr(ctx.find_root().command, "commands"):
        return ctx.find_root().command
    import typer

    from lowrank_cli.cli.app import app

    return typer.main.get_command(app)


def command_specs(exclude: tuple[str, ...] = ("run", "recipe")) -> dict[str, CommandSpec]:
    """Every registered leaf command (groups such as `recipe` have no options of their own to chain)."""
    root = root_command()
    return {name: command_spec(name, cmd) for name, cmd in root.commands.items()
            if name not in exclude and not hasattr(cmd, "commands")}


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
    if spec.choices is not None:
        kind = typing.Literal[spec.choices]  # values as written in YAML / on the command line
    elif base is bool:
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
