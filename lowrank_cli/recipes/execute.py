"""Run a plan's steps in order, in this process, through the library: each step builds its job's options
object from its validated options and calls `api.<job>(model, options)` (`JOBS[command].run`).

A step does exactly what its printed command line (`Step.shell()`) would do: both go through the same
options and the same function, and that line is what the step's lowrank.json records as its argv. Per step:
  - complete output (lowrank.json present, `recipe.yaml` recording the same options and the same input)
    -> skipped; stale (options or input changed) -> redone over it; --force -> redone;
  - an existing folder that this recipe did not write -> refused (exit 2) unless --force;
  - after the command has committed its folder, the resolved recipe is written into it as `recipe.yaml`
    (atomically: a temporary file renamed into place);
  - a failure stops the run with the step's exit code; earlier outputs stay as they are.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import logging
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lowrank_cli.api.jobs import JOBS
from lowrank_cli.errors import LowrankError, summarize
from lowrank_cli.io.manifest import MANIFEST, recording_command_line
from lowrank_cli.recipes.recipe import Plan, Step
from lowrank_cli.result import Result, error_document, ok_document
from lowrank_cli.utils.progress import Progress

__all__ = ["RunResult", "StepFailed", "execute", "run_step", "RECIPE_FILE", "output_state"]

log = logging.getLogger("lowrank")

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


def _report(exc: BaseException, first_line: str, hint: str | None) -> None:
    """A failed step's one-line error on stderr, as the command itself prints it (traceback with -v)."""
    log.debug("traceback", exc_info=exc)
    sys.stderr.write(f"error: {first_line}\n")
    for line in getattr(exc, "lines", ()):
        sys.stderr.write(f"{line}\n")
    if hint:
        sys.stderr.write(f"hint: {hint}\n")


def run_step(step: Step, runtime: dict[str, Any] | None = None, progress: Progress | None = None
             ) -> tuple[int, dict]:
    """Run one step through the library: (exit code, its result or error document). `runtime` holds the
    options `lowrank run` decides (dry_run, overwrite)."""
    runtime = runtime or {}
    job = JOBS[step.command]
    values = {step.spec.options[k].param: v for k, v in {**step.options, **runtime}.items() if k in step.spec.options}
    try:
        options = job.make_options(values)
        with recording_command_line(step.command_line(**runtime)):
            result = job.run(values.get("model"), options, progress)
    except KeyboardInterrupt:
        raise
    except Exception as exc:  # a step's failure is the run's to report: one line, its exit code
        kind, first_line, code, hint = summarize(exc)
        _report(exc, first_line, hint)
        return code, error_document(step.command, kind, first_line, code, hint)
    return 0, ok_document(step.command, result)


def _outcome(step: Step, reason: str) -> dict[str, Any]:
    return {"step": step.index, "command": step.command, "output": step.output, "status": None, "exit_code": None,
            "reason": reason or None, "command_line": step.shell(), "seconds": None}


def _runtime(step: Step, state: str, force: bool, json_mode: bool, outcome: dict) -> dict[str, Any]:
    """The flags `lowrank run` sets for a step: --json (shown in its command line), --overwrite where its
    output is stale, foreign (with --force) or complete (with --force)."""
    runtime: dict[str, Any] = {}
    options = step.spec.options
    if json_mode and "json" in options:
        runtime["json"] = True
    if state in ("stale", "foreign") and "overwrite" in options:
        runtime["overwrite"] = True
    if force and state == "complete" and "overwrite" in options:
        runtime["overwrite"], outcome["reason"] = True, "--force"
    return runtime


@dataclass
class _Run:
    """One `lowrank run`: the plan, its switches, and what happened so far."""

    plan: Plan
    dry_run: bool
    force: bool
    json_mode: bool
    quiet: bool
    progress: Progress | None
    outcomes: list[dict] = field(default_factory=list)
    fresh: set[int] = field(default_factory=set)  # steps (re)run now, or that would be: their outputs change

    def fail(self, step: Step, done: int, code: int) -> StepFailed:
        for later in self.plan.steps[done:]:
            self.outcomes.append({**_outcome(later, ""), "status": "not run"})
        return StepFailed(step, code, self.outcomes)

    def say(self, text: str) -> None:
        _say(text, self.quiet or self.json_mode)


def _state(run: _Run, step: Step) -> tuple[str, str]:
    state, reason = output_state(step)
    if state == "complete" and step.model_from in run.fresh:
        return "stale", "its input will be rewritten by an earlier step"
    return state, reason


def _plan_only(run: _Run, step: Step, n: int, runtime: dict, outcome: dict) -> bool:
    """Dry run: a step that cannot dry-run (no --dry-run, or its input does not exist yet) is only planned;
    True when planned."""
    run.fresh.add(step.index)
    waits = step.model_from in run.fresh  # its input does not exist yet, or will change
    if "dry_run" in step.spec.options and not waits:
        runtime["dry_run"] = True
        return False
    outcome.update(status="planned", exit_code=0, reason=outcome["reason"] or (
        f"reads steps.{step.model_from}'s output" if waits else "no --dry-run for this command"))
    run.say(f"[{n}/{len(run.plan.steps)}] plan {step.shell(**runtime)}")
    return True


def _execute_step(run: _Run, step: Step, n: int) -> None:
    state, reason = _state(run, step)
    outcome = _outcome(step, reason)
    run.outcomes.append(outcome)
    total = len(run.plan.steps)
    if state == "complete" and not run.force:
        outcome.update(status="skipped", exit_code=0)
        run.say(f"[{n}/{total}] skip {step.label}: {reason}")
        return
    if state == "foreign" and not run.force:
        outcome.update(status="error", exit_code=2, reason=f"{reason}; use --force to replace it")
        _say(f"error: {step.label}: {outcome['reason']}", False)
        raise run.fail(step, n, 2)
    runtime = _runtime(step, state, run.force, run.json_mode, outcome)
    if run.dry_run and _plan_only(run, step, n, runtime, outcome):
        return
    outcome["command_line"] = step.shell(**runtime)
    run.say(f"[{n}/{total}] {outcome['command_line']}" + (f"   # {outcome['reason']}" if outcome["reason"] else ""))
    if step.output and not run.dry_run:  # recipes name outputs like out/x: the commands want the parent
        Path(step.output).expanduser().parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    code, doc = run_step(step, runtime, run.progress)
    outcome.update(seconds=round(time.perf_counter() - start, 3), exit_code=code)
    if code != 0:
        outcome.update(status="error", error=doc.get("error"))
        raise run.fail(step, n, code)
    outcome.update(status="dry-run" if run.dry_run else "ok", result=doc)
    if not run.dry_run:
        run.fresh.add(step.index)
        if step.output:
            _write_recipe(step, run.plan)


def execute(plan: Plan, *, dry_run: bool = False, force: bool = False, json_mode: bool = False,
            quiet: bool = False, progress: Progress | None = None) -> RunResult:
    """Run (or with dry_run, check and plan) every step; raise StepFailed at the first failure."""
    run = _Run(plan=plan, dry_run=dry_run, force=force, json_mode=json_mode, quiet=quiet, progress=progress)
    for n, step in enumerate(plan.steps, 1):
        _execute_step(run, step, n)
    return RunResult(recipe=plan.source, name=plan.name, dry_run=dry_run, steps=run.outcomes)
