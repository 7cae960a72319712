"""Where a value comes from, in one place: defaults < recipe (or --config) < --set < explicit flags.

`resolve` is the only function that merges; `lowrank run` and every command's `--config` call it. A key
present in a layer wins over earlier layers even when its value is 0, false or null.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from lowrank_cli.recipes.schema import CommandSpec, OptionSpec, Problem, suggest

__all__ = ["resolve", "parse_set", "yaml_value", "parse_flags", "text_for"]

ROOT_FLAGS = ("-q", "--quiet", "-v", "-vv", "--verbose")


def resolve(spec: CommandSpec, *layers: Mapping[str, Any]) -> dict[str, Any]:
    """Defaults of `spec`, then each layer in order (later wins). Keys must already be canonical."""
    merged: dict[str, Any] = spec.defaults()
    for layer in layers:
        merged.update(layer)
    return merged


def yaml_value(text: str) -> Any:
    """`--set` values are YAML: 0.8 is a number, true a boolean, null nothing, [a, b] a list."""
    import yaml

    try:
        return yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError:
        return text  # e.g. an unbalanced bracket in a glob: keep the text as given


def parse_set(items: list[str]) -> tuple[list[tuple[list[str], Any, str]], list[Problem]]:
    """`a.b.c=value` -> ([a, b, c], typed value, raw text)."""
    parsed, problems = [], []
    for item in items:
        path, sep, raw = item.partition("=")
        parts = [p for p in path.strip().split(".")]
        if not sep or not all(parts):
            problems.append(Problem(f"--set {item}", "expected path.to.key=value"))
            continue
        parsed.append((parts, yaml_value(raw), raw))
    return parsed, problems


def text_for(spec: OptionSpec, value: Any, raw: str) -> Any:
    """A YAML-typed `--set` value for a text option keeps the text as typed (`--set x.text_field=yes`)."""
    if spec.base in (int, float, bool) or spec.is_list:
        return value
    return raw if isinstance(value, (bool, int, float)) or value.__class__.__name__ == "date" else value


def _coerce_flag(spec: OptionSpec, text: str, where: str) -> tuple[Any, Problem | None]:
    kind = spec.base
    try:
        if kind is int:
            return int(text), None
        if kind is float:
            return float(text), None
    except ValueError:
        name = "an integer" if kind is int else "a number"
        return None, Problem(where, f"expected {name}, got '{text}'")
    return text, None


def parse_flags(tokens: list[str], specs: list[CommandSpec], own_flags: tuple[str, ...] = ()
                ) -> tuple[dict[str, dict[str, Any]], list[Problem]]:
    """Explicit step flags given to `lowrank run` (e.g. `--device cuda --seq-len 256`) -> per command, the
    canonical key and typed value. A flag applies to every step whose command has it; one that no step has
    is an error with a suggestion."""
    found: dict[str, dict[str, Any]] = {s.name: {} for s in specs}
    problems: list[Problem] = []
    known = sorted({f for s in specs for o in s.options.values() for f in (*o.flags, o.off_flag) if f}
                   | set(own_flags))
    i = 0
    while i < len(tokens):
        token = tokens[i]
        i += 1
        if not token.startswith("-"):
            problems.append(Problem(f"'{token}'", "unexpected argument (step options go as --flag value)"))
            continue
        flag, eq, inline = token.partition("=")
        matches = [(s, m) for s in specs if (m := s.by_flag(flag))]
        if not matches and flag in ROOT_FLAGS:
            problems.append(Problem(flag, f"a global option: put it before the command (lowrank {flag} run ...)"))
            continue
        if not matches:
            problems.append(Problem(flag, f"no step of this recipe takes this option{suggest(flag, known)}"))
            if not eq and i < len(tokens) and not tokens[i].startswith("-"):
                i += 1  # its value: one problem, not two
            continue
        needs_value = not matches[0][1][0].is_flag
        if needs_value and not eq:
            if i >= len(tokens):
                problems.append(Problem(flag, "needs a value"))
                continue
            inline = tokens[i]
            i += 1
        for spec, (opt, switch) in matches:
            if opt.is_flag:
                found[spec.name][opt.key] = switch
                continue
            value, problem = _coerce_flag(opt, inline, flag)
            if problem:
                problems.append(problem)
                break
            if opt.is_list:
                found[spec.name].setdefault(opt.key, []).append(value)
            else:
                found[spec.name][opt.key] = value
    return found, problems
