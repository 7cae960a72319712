"""Run a plan's steps in order, in this process, through each command's own CLI entry.

Every step runs exactly as its printed command line would (`Step.shell()`), so a recipe never does what
the commands cannot. Per step:
  - complete output (lowrank.json present, `recipe.yaml` recording the same options and the same input)
    -> skipped; stale (options or input changed) -> redone over it; --force -> redone;
  - an existing folder that this recipe did not write -> refused (exit 2) unless --force;
  - after the command has committed its folder, the resolved recipe is written into it as `recipe.yaml`
    (atomically: a temporary file renamed into place);
  - a failure stops the run with the step's exit code; earlier outputs stay as they are.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lowrank_cli.errors import LowrankError
from lowrank_cli.io.manifest import MANIFEST
from lowrank_cli.recipes.recipe import Plan, Step
from lowrank_cli.result import Result
from lowrank_cli.utils.streams import stdout_to_stderr

__all__ = ["RunResult", "StepFailed", "execute", "RECIPE_FILE", "output_state"]

RECIPE_FILE = "recipe.yaml"


class StepFailed(LowrankError):
    """A step failed: the run stops with that step's exit code."""

    def __init__(self, step: Step, code: int, outcomes: list[dict]):
        super().__init__(f"{step.label} failed (exit {code}); later steps not run, earlier outputs kept")
        self.exit_code = code
        self.kind = "step"
        self.json_extra = {"steps": outcomes}


@dataclass
class RunResult(Result):
    recipe: str
    name: str | None
    dry_run: bool
    steps: list[dict] = field(default_factory=list)

    def summary(self):
        rows = [("recipe", self.recipe)]
        for s in self.steps:
            detail = s["status"]
            if s.get("reason"):
                detail += f": {s['reason']}"
            if s.get("output"):
                detail += f" -> {s['output']}"
            if s.get("seconds") is not None:
                detail += f" ({s['seconds']:.1f} s)"
            rows.append((f"steps.{s['step']} {s['command']}", detail))
        return rows


def _fingerprint(model: str | None) -> str | None:
    """Identity of a step's input: the sha256 of its lowrank.json (a new run of the step before it
    writes a new one), or None for hub ids and folders lowrank did not write."""
    if not model:
        return None
    manifest = Path(model).expanduser() / MANIFEST
    return hashlib.sha256(manifest.read_bytes()).hexdigest() if manifest.is_file() else None


def output_state(step: Step) -> tuple[str, str]:
    """(state, reason): none | absent | complete | stale | foreign."""
    import yaml

    if not step.output:
        return "none", ""
    out = Path(step.output).expanduser()
    if not out.exists() or (out.is_dir() and not any(out.iterdir())):
        return "absent", ""
    if not (out / MANIFEST).is_file():
        return "foreign", f"{step.output} exists but holds no {MANIFEST}"
    try:
        saved = yaml.safe_load((out / RECIPE_FILE).read_text())
        record = saved["produced_by"]
        (command, options), = saved["steps"][record["step"]].items()
        options = dict(options)
    except (OSError, yaml.YAMLError, KeyError, TypeError, IndexError, ValueError):
        return "foreign", f"{step.output} was not written by a recipe step (no readable {RECIPE_FILE})"
    if command != step.command:
        return "foreign", f"{step.output} was written by a '{command}' step"
    # an option the record lacks (added to the command since) counts as its default; one the command no
    # longer has cannot matter
    recorded = {k: options.get(k, spec.default) for k, spec in step.spec.options.items() if k in step.options}
    changed = [k for k in step.options if recorded[k] != step.options[k]]
    if changed:
        return "stale", "options changed: " + ", ".join(
            f"{k} {recorded[k]!r} -> {step.options[k]!r}" for k in changed)
    if record.get("input_manifest_sha256") != _fingerprint(step.options.get("model")):
        return "stale", "its input was rewritten since"
    return "complete", "complete output with the same options and input"


def _write_recipe(step: Step, plan: Plan) -> None:
    import yaml

    from lowrank_cli import __version__

    out = Path(step.output).expanduser()
    if not (out / MANIFEST).is_file():  # e.g. the command wrote nothing (dry run)
        return
    doc = plan.document()
    doc["produced_by"] = {
        "step": step.index, "command": step.command, "recipe": plan.source, "lowrank": __version__,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "input_manifest_sha256": _fingerprint(step.options.get("model")),
    }
    header = (f"# The resolved recipe that produced this folder ({step.label}), from {plan.source}.\n"
              f"# Repeat the run: lowrank run {out / RECIPE_FILE}\n")
    tmp = out / f".{RECIPE_FILE}.tmp-{os.getpid()}"
    tmp.write_text(header + yaml.safe_dump(doc, sort_keys=False, allow_unicode=True))
    os.replace(tmp, out / RECIPE_FILE)


def _say(text: str, quiet: bool) -> None:
    if not quiet:
        sys.stderr.write(text + "\n")
        sys.stderr.flush()


def _invoke(step: Step, runtime: dict[str, Any]) -> tuple[int, dict | None]:
    """Run one step through its click command; (exit code, the runner's result or error document)."""
    import typer

    try:
        from typer._click import exceptions as click_errors
    except ImportError:  # pragma: no cover - older typer
        from click import exceptions as click_errors

    from lowrank_cli.cli.runner import STATE

    argv = step.argv(**runtime)
    captured: list[dict] = []
    saved_argv, saved_sink = sys.argv, STATE.sink
    sys.argv = ["lowrank", step.command, *argv]  # what the step's manifest records as its command line
    STATE.sink = captured.append
    try:
        code = step.spec.command.main(args=argv, prog_name=f"lowrank {step.command}", standalone_mode=False)
    except click_errors.ClickException as exc:  # the command's own parsing refused a value
        sys.stderr.write(f"error: {exc.format_message()}\n")
        code = exc.exit_code
        captured.append({"error": {"type": "usage", "message": exc.format_message(), "hint": None}})
    except typer.Abort:
        code = 130
    finally:
        sys.argv, STATE.sink = saved_argv, saved_sink
    code = code if isinstance(code, int) else 0
    return code, (captured[-1] if captured else None)


def execute(plan: Plan, *, dry_run: bool = False, force: bool = False, json_mode: bool = False,
            quiet: bool = False) -> RunResult:
    """Run (or with dry_run, check and plan) every step; raise StepFailed at the first failure."""
    outcomes: list[dict] = []
    fresh: set[int] = set()  # steps (re)run now, or that would be: their outputs change
    total = len(plan.steps)
    for n, step in enumerate(plan.steps, 1):
        state, reason = output_state(step)
        if state == "complete" and step.model_from in fresh:
            state, reason = "stale", "its input will be rewritten by an earlier step"
        outcome = {"step": step.index, "command": step.command, "output": step.output, "status": None,
                   "exit_code": None, "reason": reason or None, "command_line": step.shell(), "seconds": None}
        outcomes.append(outcome)
        if state == "complete" and not force:
            outcome.update(status="skipped", exit_code=0)
            _say(f"[{n}/{total}] skip {step.label}: {reason}", quiet or json_mode)
            continue
        if state == "foreign" and not force:
            outcome.update(status="error", exit_code=2, reason=f"{reason}; use --force to replace it")
            _say(f"error: {step.label}: {outcome['reason']}", False)
            _not_run(plan, n, outcomes)
            raise StepFailed(step, 2, outcomes)
        runtime: dict[str, Any] = {}
        options = step.spec.options
        if json_mode and "json" in options:
            runtime["json"] = True
        if state in ("stale", "foreign") and "overwrite" in options:
            runtime["overwrite"] = True
        if force and state == "complete" and "overwrite" in options:
            runtime["overwrite"], outcome["reason"] = True, "--force"
        if dry_run:
            fresh.add(step.index)
            waits = step.model_from in fresh  # its input does not exist yet, or will change
            if "dry_run" not in options or waits:
                outcome.update(status="planned", exit_code=0, reason=outcome["reason"] or (
                    f"reads steps.{step.model_from}'s output" if waits else "no --dry-run for this command"))
                _say(f"[{n}/{total}] plan {step.shell(**runtime)}", quiet or json_mode)
                continue
            runtime["dry_run"] = True
        _say(f"[{n}/{total}] {step.shell(**runtime)}" + (f"   # {outcome['reason']}" if outcome["reason"]
                                                          else ""), quiet or json_mode)
        outcome["command_line"] = step.shell(**runtime)
        if step.output and not dry_run:  # recipes name outputs like out/x: the commands want the parent
            Path(step.output).expanduser().parent.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        with stdout_to_stderr() if json_mode else contextlib.nullcontext():
            code, doc = _invoke(step, runtime)
        outcome["seconds"] = round(time.perf_counter() - start, 3)
        outcome["exit_code"] = code
        if doc is not None:
            outcome["result" if code == 0 else "error"] = doc if code == 0 else doc.get("error")
        if code != 0:
            outcome["status"] = "error"
            _not_run(plan, n, outcomes)
            raise StepFailed(step, code, outcomes)
        outcome["status"] = "dry-run" if dry_run else "ok"
        if not dry_run:
            fresh.add(step.index)
            if step.output:
                _write_recipe(step, plan)
    return RunResult(recipe=plan.source, name=plan.name, dry_run=dry_run, steps=outcomes)


def _not_run(plan: Plan, done: int, outcomes: list[dict]) -> None:
    for step in plan.steps[done:]:
        outcomes.append({"step": step.index, "command": step.command, "output": step.output,
                         "status": "not run", "exit_code": None, "reason": None,
                         "command_line": step.shell(), "seconds": None})
