"""A recipe file -> a validated plan of steps, every problem reported at once.

Shape (llm-compressor keeps its recipe next to the output; torchtune's dotted overrides)::

    name: demo                       # optional
    description: ...                 # optional, shown by `lowrank recipe ls`
    steps:
      - decompose: {model: demo, output: out/demo-lord, params_ratio: 0.8}
      - eval: {}                     # model: the previous step's output

Step options are named as the command's flags with underscores; `model` and `output` are keys. A step
without `model` takes the output of the latest earlier step that wrote one. `--set` paths:
`steps.N.CMD.key=v` or `steps.N.key=v` (N counts from 0, as in the error messages), `CMD.key=v` (every step
running CMD), `key=v` (every step whose command has that option). Precedence is `layers.resolve`'s:
defaults < (chained model) < recipe < --set < explicit flags.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lowrank_cli.errors import UsageError
from lowrank_cli.recipes import layers
from lowrank_cli.recipes.schema import CommandSpec, Problem, canonical_keys, check_values, command_specs, suggest
from lowrank_cli.recipes.shipped import locate, shipped

__all__ = ["Step", "Plan", "RecipeInvalid", "load_plan", "plan_from_document", "to_argv", "RUN_CONTROLLED",
           "TOP_KEYS"]

TOP_KEYS = ("name", "description", "steps", "produced_by")
# options a step may not set: `lowrank run` decides them for every step
RUN_CONTROLLED = {
    "json": "set by `lowrank run --json`, not per step",
    "dry_run": "set by `lowrank run --dry-run`, not per step",
    "overwrite": "set by `lowrank run --force` (complete outputs are skipped, stale ones redone)",
}


class RecipeInvalid(UsageError):
    """Every problem of a recipe (exit 2); the runner prints each on its own line."""

    def __init__(self, source: str, problems: list[Problem]):
        count = f"{len(problems)} problem{'s' if len(problems) != 1 else ''}"
        super().__init__(f"recipe {source}: {count}")
        self.problems = problems
        self.lines = [f"  {p}" for p in problems]
        self.json_extra = {"errors": [{"where": p.where, "message": p.message} for p in problems]}


@dataclass
class Step:
    index: int
    command: str
    options: dict[str, Any]  # every option, resolved (run-controlled keys left out)
    spec: CommandSpec = field(repr=False)
    model_from: int | None = None  # the step whose output this one reads

    @property
    def output(self) -> str | None:
        return self.options.get("output")

    @property
    def label(self) -> str:
        return f"steps.{self.index}.{self.command}"

    def argv(self, **runtime: Any) -> list[str]:
        return to_argv(self.spec, {**self.options, **runtime})

    def shell(self, **runtime: Any) -> str:
        return shlex.join(["lowrank", self.command, *self.argv(**runtime)])


@dataclass
class Plan:
    source: str
    name: str | None
    description: str | None
    steps: list[Step]

    def document(self) -> dict[str, Any]:
        """The resolved recipe: every step with every option, chaining made explicit; runnable as is."""
        doc: dict[str, Any] = {}
        if self.name:
            doc["name"] = self.name
        if self.description:
            doc["description"] = self.description
        doc["steps"] = [{s.command: dict(s.options)} for s in self.steps]
        return doc


def _text(value: Any) -> str:
    return repr(value) if isinstance(value, float) else str(value)


def to_argv(spec: CommandSpec, options: dict[str, Any]) -> list[str]:
    """The command line that gives a command these options: arguments in order, then every option that
    differs from its default (so `lowrank run --dry-run` can print an exact, minimal command)."""
    args: list[str] = []
    for key, opt in spec.options.items():
        if opt.is_argument and key in options:
            value = options[key]
            args += [_text(v) for v in value] if opt.is_list else [_text(value)]
    for key, opt in spec.options.items():
        if opt.is_argument or key not in options or options[key] == opt.default or options[key] is None:
            continue
        value = options[key]
        if opt.is_flag:
            switch = opt.flag if value else opt.off_flag
            if switch:
                args.append(switch)
        elif opt.is_list:
            for item in value:
                args += [opt.flag, _text(item)]
        else:
            args += [opt.flag, _text(value)]
    return args


def _read(source: str | Path) -> tuple[str, Any]:
    import yaml

    path = locate(source)
    if path is None:
        names = ", ".join(shipped()) or "none"
        raise RecipeInvalid(str(source), [Problem("", f"no such file, and no shipped recipe of that name "
                                                      f"(shipped: {names}; see `lowrank recipe ls`)")])
    try:
        return str(path), yaml.safe_load(path.read_bytes())  # bytes: yaml reports bad encodings
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}" if mark is not None else ""
        raise RecipeInvalid(str(path), [Problem(where, f"not valid YAML: {getattr(exc, 'problem', exc)}")]) \
            from None
    except OSError as exc:
        raise RecipeInvalid(str(path), [Problem("", f"cannot read: {exc.strerror or exc}")]) from None


def load_plan(source: str | Path, sets: list[str] = (), flags: list[str] = ()) -> Plan:
    """Read, override, chain and validate a recipe; raise RecipeInvalid listing every problem."""
    path, doc = _read(source)
    return plan_from_document(doc, path, sets=sets, flags=flags)


def _steps_of(doc: Any, problems: list[Problem]) -> list[tuple[str, dict]]:
    if not isinstance(doc, dict):
        problems.append(Problem("", "a recipe is a mapping with a `steps:` list"))
        return []
    for key in doc:
        if key not in TOP_KEYS:
            problems.append(Problem(str(key), f"unknown recipe key{suggest(str(key), TOP_KEYS)}"))
    raw = doc.get("steps")
    if not isinstance(raw, list) or not raw:
        problems.append(Problem("steps", "a non-empty list of steps, e.g. `- decompose: {model: demo}`"))
        return []
    steps = []
    for i, item in enumerate(raw):
        if not isinstance(item, dict) or len(item) != 1:
            problems.append(Problem(f"steps.{i}", "each step is a one-key mapping: `- COMMAND: {options}`"))
            steps.append(("", {}))
            continue
        (command, options), = item.items()
        options = {} if options is None else options
        if not isinstance(options, dict):
            problems.append(Problem(f"steps.{i}.{command}", "options are a mapping of key: value"))
            options = {}
        steps.append((str(command), dict(options)))
    return steps


def _apply_sets(sets: list[str], doc: dict, steps: list[tuple[str, dict]], specs: dict[str, CommandSpec],
                problems: list[Problem]) -> list[dict[str, Any]]:
    """--set overrides -> one layer per step (keys as given; canonicalized with the step's own keys)."""
    parsed, bad = layers.parse_set(list(sets))
    problems += bad
    per_step: list[dict[str, Any]] = [{} for _ in steps]
    commands = [c for c, _ in steps]

    def put(i: int, key: str, value: Any, raw: str) -> None:
        spec = specs.get(commands[i])
        canonical = spec.key_for(key) if spec else None
        per_step[i][key] = layers.text_for(spec.options[canonical], value, raw) if canonical else value

    for parts, value, raw in parsed:
        where = f"--set {'.'.join(parts)}"
        head = parts[0]
        if head == "steps":
            if len(parts) < 3 or not parts[1].isdigit() or int(parts[1]) >= len(steps):
                problems.append(Problem(where, f"expected steps.N.key with N in 0..{len(steps) - 1}"))
                continue
            i, rest = int(parts[1]), parts[2:]
            if len(rest) > 1 and rest[0] == commands[i]:
                rest = rest[1:]
            if len(rest) != 1:
                problems.append(Problem(where, f"steps.{i} runs '{commands[i]}': expected "
                                               f"steps.{i}.{commands[i]}.KEY or steps.{i}.KEY"))
                continue
            put(i, rest[0], value, raw)
        elif len(parts) == 1 and head in ("name", "description"):
            doc[head] = value
        elif len(parts) == 2 and head in commands:
            for i, command in enumerate(commands):
                if command == head:
                    put(i, parts[1], value, raw)
        elif len(parts) == 2 and head in specs:
            problems.append(Problem(where, f"this recipe has no '{head}' step"))
        elif len(parts) == 1:
            takers = [i for i, c in enumerate(commands) if c in specs and specs[c].key_for(head)]
            if not takers:
                names = {k for c in commands if c in specs for k in specs[c].options}
                problems.append(Problem(where, f"no step of this recipe takes '{head}'{suggest(head, names)}"))
            for i in takers:
                put(i, head, value, raw)
        else:
            problems.append(Problem(where, "expected steps.N.key, COMMAND.key or key"
                                           f"{suggest(head, [*commands, 'steps'])}"))
    return per_step


def plan_from_document(doc: Any, source: str, sets: list[str] = (), flags: list[str] = ()) -> Plan:
    problems: list[Problem] = []
    steps = _steps_of(doc, problems)
    specs = command_specs()
    per_step_sets = _apply_sets(list(sets), doc if isinstance(doc, dict) else {}, steps, specs, problems)
    used = [specs[c] for c in dict.fromkeys(c for c, _ in steps) if c in specs]
    flag_layers, bad = layers.parse_flags(list(flags), used, own_flags=("--set", "--dry-run", "--force",
                                                                         "--json", "--config"))
    problems += bad

    plan_steps: list[Step] = []
    latest_output: tuple[int, str] | None = None
    outputs: dict[str, int] = {}
    for i, (command, given) in enumerate(steps):
        where = f"steps.{i}.{command}"
        spec = specs.get(command)
        if spec is None:
            if command:
                known = ", ".join(specs)
                problems.append(Problem(f"steps.{i}", f"unknown command '{command}'{suggest(command, specs)}; "
                                                      f"this lowrank has: {known}"))
            latest_output = None  # a later step cannot know what an unknown step writes
            continue
        recipe_layer, bad = canonical_keys(spec, given, where, RUN_CONTROLLED)
        set_layer, bad2 = canonical_keys(spec, per_step_sets[i], where, RUN_CONTROLLED)
        flag_layer, bad3 = canonical_keys(spec, flag_layers.get(command, {}), where, RUN_CONTROLLED)
        problems += bad + bad2 + bad3
        chain_layer: dict[str, Any] = {}
        model_from = None
        explicit_model = any("model" in layer for layer in (recipe_layer, set_layer, flag_layer))
        if "model" in spec.options and not explicit_model:
            if latest_output is None:
                problems.append(Problem(f"{where}.model", "is required: no earlier step writes an output "
                                                          "to take it from"))
            else:
                model_from, chain_layer["model"] = latest_output
        merged = layers.resolve(spec, chain_layer, recipe_layer, set_layer, flag_layer)
        options, bad = check_values(spec, merged, where)
        problems += [p for p in bad if p.where not in {q.where for q in problems}]  # a missing model: once
        options = {k: v for k, v in options.items() if k not in RUN_CONTROLLED}
        step = Step(index=i, command=command, options=options, spec=spec, model_from=model_from)
        if step.output:
            key = str(Path(step.output).expanduser().resolve())
            if key in outputs:
                problems.append(Problem(f"{where}.output", f"steps.{outputs[key]} writes the same folder"))
            outputs[key] = i
            latest_output = (i, step.output)
        plan_steps.append(step)
    if problems:
        raise RecipeInvalid(source, problems)
    return Plan(source=source, name=doc.get("name"), description=doc.get("description"), steps=plan_steps)
