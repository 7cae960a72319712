"""`--config FILE` for every command, added where the root group is built (so a command registered later
gets it without a line of its own).

The file is a YAML (or JSON) mapping of the command's own options, keyed like recipe steps
(`params_ratio: 0.8`, `model: demo`, `output: out/x`); a recipe file with exactly one step for this command
works too. Values are checked against the command's strict schema, unknown keys are refused with a
suggestion (exit 2, all problems at once), and `layers.resolve` merges: defaults < config < explicit flags.
"""

from __future__ import annotations

from typing import Annotated, Any

import typer
from typer.core import TyperGroup

try:  # typer >= 0.29 vendors click as typer._click
    from typer._click import exceptions as click_errors
    from typer._click.core import ParameterSource
except ImportError:  # pragma: no cover - older typer
    from click import exceptions as click_errors
    from click.core import ParameterSource

from lowrank_cli.recipes.schema import CONFIG_KEY

__all__ = ["ConfigGroup", "add_config_option", "ConfigError"]

_META = "lowrank.config"


class ConfigError(click_errors.UsageError):
    """A bad --config file: every problem on its own line (exit 2)."""

    def __init__(self, path: str, problems: list):
        lines = "\n".join(f"  {p}" for p in problems)
        super().__init__(f"--config {path}: {len(problems)} problem{'s' if len(problems) != 1 else ''}\n{lines}")


def _config_param():
    """A Typer-built `--config` option (built by Typer itself, so help and parsing match the others)."""

    def prototype(config: Annotated[str | None, typer.Option(
            "--config", help="YAML/JSON file of this command's options (keys = flags with underscores, "
            "e.g. params_ratio: 0.8); explicit flags win.", rich_help_panel="Runtime", show_default=False,
            is_eager=True)] = None) -> None:
        pass

    proto = typer.Typer(add_completion=False)
    proto.command()(prototype)
    (param,) = [p for p in typer.main.get_command(proto).params if p.name == CONFIG_KEY]
    param.callback = _load_config
    return param


def _read_mapping(path: str, command_name: str) -> dict:
    import yaml

    try:
        with open(path, encoding="utf-8") as handle:
            doc = yaml.safe_load(handle)
    except OSError as exc:
        raise ConfigError(path, [f"cannot read: {exc.strerror or exc}"]) from None
    except UnicodeDecodeError as exc:
        raise ConfigError(path, [f"not UTF-8 text (byte {exc.start}); save it as UTF-8"]) from None
    except yaml.YAMLError as exc:
        raise ConfigError(path, [f"not valid YAML/JSON: {exc}"]) from None
    if isinstance(doc, dict) and isinstance(doc.get("steps"), list):  # a recipe: take this command's step
        mine = [s[command_name] for s in doc["steps"] if isinstance(s, dict) and command_name in s]
        if len(mine) != 1:
            raise ConfigError(path, [f"a recipe with {len(mine)} '{command_name}' steps; --config needs "
                                     "exactly one (or use `lowrank run`)"])
        doc = mine[0] or {}
    if doc is None:
        return {}
    if not isinstance(doc, dict):
        raise ConfigError(path, ["expected a mapping of option: value"])
    return doc


def _load_config(ctx, param, value):
    """Eager: read and key-check the file before the other parameters are processed; a required argument
    (MODEL) given only in the file reaches click through the context's default map."""
    if value is None or ctx.resilient_parsing:
        return value
    from lowrank_cli.recipes.layers import resolve
    from lowrank_cli.recipes.schema import canonical_keys, check_values, command_spec

    spec = command_spec(ctx.info_name or ctx.command.name, ctx.command)
    given, problems = canonical_keys(spec, _read_mapping(value, spec.name))
    # the file's values, checked now so wrong keys and wrong values are reported together; a required
    # argument missing here may still come from the command line
    problems += [p for p in check_values(spec, resolve(spec, given))[1] if p.where.split(".")[0] in given]
    if problems:
        raise ConfigError(value, problems)
    ctx.meta[_META] = (value, given)
    arguments = {o.param: given[k] for k, o in spec.options.items() if o.required and k in given}
    if arguments:
        ctx.default_map = {**(ctx.default_map or {}), **arguments}
    return value


def _with_config(command, callback):
    def invoke(**kwargs: Any):
        kwargs.pop(CONFIG_KEY, None)
        ctx = click_context()
        if _META not in ctx.meta:
            return callback(**kwargs)
        from lowrank_cli.recipes.layers import resolve
        from lowrank_cli.recipes.schema import check_values, command_spec

        path, config = ctx.meta[_META]
        spec = command_spec(ctx.info_name or command.name, command)
        explicit_sources = (ParameterSource.COMMANDLINE, ParameterSource.ENVIRONMENT, ParameterSource.PROMPT)
        flags = {k: _to_plain(kwargs[o.param]) for k, o in spec.options.items()
                 if o.param in kwargs and ctx.get_parameter_source(o.param) in explicit_sources}
        values, problems = check_values(spec, resolve(spec, config, flags))
        if problems:
            raise ConfigError(path, problems)
        return callback(**{o.param: _to_python(o, values[k]) for k, o in spec.options.items()})

    invoke.__wrapped__ = callback
    return invoke


def _to_plain(value):
    """What click parsed (Enum members, Paths, tuples) -> the plain values the schema checks."""
    import enum
    from pathlib import PurePath

    if isinstance(value, (list, tuple)):
        return [_to_plain(v) for v in value]
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, PurePath):
        return str(value)
    return value


def _to_python(spec, value):
    """Schema values (plain YAML types) -> what the command function receives from click."""
    import enum
    from pathlib import Path

    convert = None
    if isinstance(spec.base, type) and issubclass(spec.base, enum.Enum):
        convert = spec.base
    elif spec.base is Path:
        convert = Path
    if convert is None or value is None:
        return value
    return [convert(v) for v in value] if spec.is_list else convert(value)


def click_context():
    try:
        from typer._click.globals import get_current_context
    except ImportError:  # pragma: no cover - older typer
        from click import get_current_context
    return get_current_context()


def add_config_option(command) -> None:
    """Give one click command `--config` (idempotent)."""
    if any(p.name == CONFIG_KEY for p in command.params) or command.callback is None:
        return
    command.params.append(_config_param())
    command.callback = _with_config(command, command.callback)


class ConfigGroup(TyperGroup):
    """The root group: every leaf command it holds takes `--config FILE`."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        for command in self.commands.values():
            if not hasattr(command, "commands"):  # sub-groups (e.g. `recipe`) have no options to configure
                add_config_option(command)
