"""Recipes (`lowrank run`, `lowrank recipe`), schemas generated from the options dataclasses, precedence,
`--config`."""

from __future__ import annotations

import dataclasses
import json
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import typer
import yaml
from typer.testing import CliRunner

from lowrank_cli.api.jobs import JOBS, Job
from lowrank_cli.api.options.fields import option, parse_fraction
from lowrank_cli.cli.app import app
from lowrank_cli.cli.commands import job_command
from lowrank_cli.cli.config_option import ConfigGroup
from lowrank_cli.recipes.layers import resolve
from lowrank_cli.recipes.recipe import RecipeInvalid, load_plan, plan_from_document, to_argv
from lowrank_cli.recipes.schema import check_values, command_specs
from lowrank_cli.recipes.shipped import header_command, shipped

runner = CliRunner()
ROOT = Path(__file__).resolve().parents[1]
SHIPPED = sorted(shipped())
# small enough for seconds on the tiny test checkpoints
TINY_DECOMPOSE = {"params_ratio": 0.8, "calib_samples": 2, "seq_len": 32, "eval_tokens": 128}


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def json_of(result) -> dict:
    lines = [ln for ln in result.stdout.splitlines() if ln.strip()]
    assert len(lines) == 1, f"expected exactly one JSON line, got {result.stdout!r} / {result.stderr!r}"
    return json.loads(lines[0])


def write_recipe(folder: Path, steps: list, name: str = "r.yaml", **top) -> Path:
    path = folder / name
    path.write_text(yaml.safe_dump({**top, "steps": steps}, sort_keys=False))
    return path


# --------------------------------------------------------------------------------------------------------
# schemas come from the options dataclasses


def test_decompose_schema_follows_its_flags():
    spec = command_specs()["decompose"]
    opts = spec.options
    assert opts["model"].is_argument and opts["model"].required
    assert opts["output"].flags == ("--output", "-o")
    assert opts["seq_len"].param == "calib_seq_len"  # key from the flag, not the field's name
    assert opts["data"].aliases == ("eval_data",) and spec.key_for("eval_data") == "data"
    # a switch whose default (None) leaves the choice to the run: sequential below a kept fraction of 0.75
    assert opts["sequential"].off_flag == "--no-sequential" and opts["sequential"].default is None
    assert opts["sequential"].base is bool
    assert opts["params_ratio"].base is float and opts["params_ratio"].default is None
    assert opts["rank_multiple"].base is int and opts["rank_multiple"].default == 8
    assert opts["batch_size"].minimum == 1
    assert "config" not in opts  # the generic --config option is never a key


def test_schema_is_strict():
    spec = command_specs()["decompose"]
    good, problems = check_values(spec, resolve(spec, {"model": "demo", "params_ratio": 1, "sequential": False,
                                                       "target_ppl_increase": 0.01}))
    assert problems == []
    assert good["params_ratio"] == 1.0 and good["sequential"] is False
    assert good["target_ppl_increase"] == "0.01"  # text options take YAML numbers as their text
    _, problems = check_values(spec, resolve(spec, {"model": "demo", "rank": 1.5, "sequential": "yes",
                                                    "batch_size": 0}))
    assert {p.where for p in problems} == {"rank", "sequential", "batch_size"}


def _sample(opt):
    """A valid value for an option that differs from its default."""
    if opt.base is bool:
        return not opt.default
    if opt.base is int:
        return max(int(opt.minimum or 0), (opt.default or 0)) + 3
    if opt.base is float:
        return 0.25 if opt.default != 0.25 else 0.5
    value = "x-value" if opt.default != "x-value" else "y-value"
    return [value, "second"] if opt.is_list else value


@pytest.mark.parametrize("name", sorted(command_specs()))
def test_every_registered_command_round_trips_through_its_command_line(name):
    """For every registered command (those of the other issues included, whatever their flags are now):
    a value for each option -> the schema accepts it -> the generated command line parses back, with
    Click, into exactly those values."""
    spec = command_specs()[name]
    # (a switch that is on by default and has no --no-x cannot be turned off from the command line)
    values = {k: _sample(o) for k, o in spec.options.items() if not (o.is_flag and o.default and not o.off_flag)}
    resolved, problems = check_values(spec, resolve(spec, values))
    assert problems == []
    argv = to_argv(spec, resolved)
    ctx = typer.main.get_command(app).commands[name].make_context(name, argv)
    for key, opt in spec.options.items():
        parsed = ctx.params[opt.param]
        parsed = [*parsed] if isinstance(parsed, tuple) else parsed
        assert parsed == resolved[key], key


@pytest.mark.parametrize("name", sorted(JOBS))
def test_every_job_is_a_library_function_of_its_options(name):
    """`JOBS[name].run(model, options)` calls `lowrank_cli.api.<module>.<function>(model, options, progress)`
    (env: without a model), and its options' defaults build without arguments."""
    import importlib
    import inspect

    job = JOBS[name]
    module, function = job.function.split(":")
    params = list(inspect.signature(getattr(importlib.import_module(module), function)).parameters)
    assert params[:3] == (["model", "opts", "progress"] if job.takes_model else ["opts", "progress"])
    assert dataclasses.is_dataclass(job.make_options({}))


@dataclasses.dataclass
class PaintOptions:  # a throwaway job: fields with and without metadata
    output: str | None = option(None, flags=("--output", "-o"), help="Where.")
    coats: int = option(2, min=1, help="Coats of paint.", panel="Paint")
    share: float | None = option(None, parse=lambda text: parse_fraction(text, "--share"))
    glossy: bool = option(True, negatable=True)
    tag: list[str] | None = None
    thinner_ml: int = 0


def test_a_field_added_to_an_options_dataclass_is_a_flag_and_a_recipe_key(tmp_path, monkeypatch):
    """Nothing is listed by hand: every field of a job's options (metadata or not) becomes a flag with its
    help and panel, a recipe key with its type and bounds, and a --config key; the command builds the
    options object (text parsed) and calls the job's function."""
    seen = {}

    def paint(model, options, progress):
        seen.update(model=model, options=options)
        from lowrank_cli.result import Result

        return Result()

    monkeypatch.setitem(globals(), "paint_job_function", paint)
    job = Job("paint", PaintOptions, f"{__name__}:paint_job_function")
    monkeypatch.setitem(JOBS, "paint", job)

    spec = command_specs()["paint"]
    assert list(spec.options) == ["model", "output", "coats", "share", "glossy", "tag", "thinner_ml", "json"]
    assert spec.options["coats"].minimum == 1 and spec.options["tag"].is_list
    assert spec.options["glossy"].off_flag == "--no-glossy" and spec.options["thinner_ml"].flags == ("--thinner-ml",)
    _, problems = check_values(spec, resolve(spec, {"model": "m", "coats": 0, "thinner_ml": "lots"}))
    assert {p.where for p in problems} == {"coats", "thinner_ml"}
    plan = plan_from_document({"steps": [{"paint": {"model": "wall", "share": "5%", "thinner_ml": 3}}]}, "t")
    assert plan.steps[0].shell() == "lowrank paint wall --share 5% --thinner-ml 3"

    toy = typer.Typer(cls=ConfigGroup)
    toy.command("paint")(job_command(job, "Paint a wall."))
    toy.command("other")(lambda: None)
    help_text = runner.invoke(toy, ["paint", "--help"], env={"COLUMNS": "200"}).stdout
    assert all(f in help_text for f in ("--coats", "Coats of paint.", "Paint", "--no-glossy", "--thinner-ml",
                                        "--tag", "--share", "--config", "--json"))
    config = tmp_path / "paint.yaml"
    config.write_text("model: wall\ncoats: 3\ntag: [a, b]\nshare: 5%\n")
    result = runner.invoke(toy, ["paint", "--config", str(config), "--coats", "5", "--no-glossy", "--json"])
    assert result.exit_code == 0, result.output
    assert seen == {"model": "wall", "options": PaintOptions(coats=5, share=0.05, glossy=False, tag=["a", "b"])}


# --------------------------------------------------------------------------------------------------------
# shipped recipes


def test_the_shipped_recipes_are_there():
    """From a source checkout, the shipped recipes are the top-level recipes/ folder (the wheel's copy inside
    the package: tests/test_packaging.py)."""
    assert {"starcoder-lord-1pct", "lord-gptq4-qlora", "trp-small", "demo"} <= set(SHIPPED)
    assert all(path.parent == ROOT / "recipes" for path in shipped().values())


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_recipe_opens_with_its_command(name):
    text = shipped()[name].read_text()
    assert text.startswith("# lowrank run ")
    assert header_command(text) == f"lowrank run {name}.yaml"


def _commands_in_comments(text: str) -> list[list[str]]:
    found = []
    for line in text.splitlines():
        if line.startswith("#") and "lowrank run " in line:
            found.append(shlex.split(line.split("lowrank run ", 1)[1].split("  #")[0].split("  (")[0]))
    return found


@pytest.mark.parametrize("name", SHIPPED)
def test_commands_in_recipe_comments_are_valid(name):
    """The header and every variation a recipe's comments suggest validate against the registered commands."""
    commands = _commands_in_comments(shipped()[name].read_text())
    assert commands and commands[0] == [f"{name}.yaml"]
    for args in commands:
        sets, flags, rest = [], [], iter(args[1:])
        for token in rest:
            if token == "--set":
                sets.append(next(rest))
            elif token not in ("--dry-run", "--force", "--json"):
                flags.append(token)
        load_plan(args[0], sets=sets, flags=flags)


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_recipe_validates(name):
    """Every step whose command is registered validates; a step whose command is not registered (yet) fails
    only as an unknown command, so this test tightens by itself when the command lands."""
    registered = set(command_specs())
    try:
        plan = load_plan(name)
    except RecipeInvalid as exc:
        for problem in exc.problems:
            assert "unknown command" in problem.message, str(problem)
            command = problem.message.split("'")[1]
            assert command not in registered
        pytest.fail(f"{name}: steps for unregistered commands: {[str(p) for p in exc.problems]}")
    assert [s.command for s in plan.steps] == [next(iter(s)) for s in yaml.safe_load(
        shipped()[name].read_text())["steps"]]
    for step in plan.steps[1:]:
        assert step.model_from is not None or "model" in yaml.safe_load(shipped()[name].read_text())[
            "steps"][step.index][step.command]


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_recipe_dry_runs(name, tiny_llama, tmp_path, monkeypatch):
    """On this machine (no GPU, no network) the first step reads the tiny checkpoint (256 positions) and
    every step runs on the CPU; steps that support --dry-run run it, the others are planned; nothing is
    written."""
    monkeypatch.chdir(tmp_path)
    first = next(iter(yaml.safe_load(shipped()[name].read_text())["steps"][0]))
    result = invoke("run", name, "--dry-run", "--json", "--set", f"steps.0.{first}.model={tiny_llama}",
                    "--device", "cpu", "--seq-len", "64")
    doc = json_of(result)
    assert result.exit_code == 0, doc
    assert doc["dry_run"] is True
    assert all(s["status"] in ("dry-run", "planned") for s in doc["steps"])
    dry = [s for s in doc["steps"] if s["status"] == "dry-run"]
    assert all(s["result"]["dry_run"] for s in dry)
    if first == "decompose":
        assert dry and dry[0]["result"]["params"]["targeted_layers"] > 0
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------------------------------------
# validation: every problem at once


def test_bad_recipe_reports_every_wrong_key_with_a_suggestion(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    recipe = write_recipe(tmp_path, [
        {"decompose": {"model": "demo", "output": "out/a", "params_ration": 0.8, "calib_sample": 4}},
        {"eval": {"max_token": 512}},
    ])
    result = invoke("run", recipe, "--json")
    assert result.exit_code == 2
    doc = json_of(result)
    assert doc["status"] == "error"
    found = {e["where"]: e["message"] for e in doc["errors"]}
    assert found == {
        "steps.0.decompose.params_ration": "unknown option for 'decompose' (did you mean 'params_ratio'?)",
        "steps.0.decompose.calib_sample": "unknown option for 'decompose' (did you mean 'calib_samples'?)",
        "steps.1.eval.max_token": "unknown option for 'eval' (did you mean 'max_tokens'?)",
    }
    assert sum("did you mean" in line for line in result.stderr.splitlines()) == 3
    assert not (tmp_path / "out").exists()


def test_validate_reports_structure_types_commands_and_chaining_together(tmp_path):
    recipe = write_recipe(tmp_path, [
        {"eval": {"seq_len": "long"}},  # no model to chain from, and a wrong type
        {"quantise": {"bits": 4}},
        {"decompose": {"model": "demo", "json": True}},
    ], nmae="x")
    result = invoke("recipe", "validate", recipe)
    assert result.exit_code == 2
    text = result.stderr
    assert "nmae: unknown recipe key (did you mean 'name'?)" in text
    assert "steps.0.eval.model: is required" in text
    assert "steps.0.eval.seq_len: expected an integer, got 'long'" in text
    assert "steps.1: unknown command 'quantise' (did you mean 'quantize'?)" in text
    assert "steps.2.decompose.json: set by `lowrank run --json`" in text


def test_unknown_command_is_reported_as_such(tmp_path):
    recipe = write_recipe(tmp_path, [{"decompose": {"model": "demo", "output": "o"}}, {"distill": {}}])
    with pytest.raises(RecipeInvalid) as info:
        load_plan(recipe)
    (problem,) = info.value.problems
    assert problem.where == "steps.1" and problem.message.startswith("unknown command 'distill'")
    assert "decompose" in problem.message  # lists what this lowrank has


def test_missing_recipe_and_bad_yaml(tmp_path):
    result = invoke("run", tmp_path / "nope.yaml")
    assert result.exit_code == 2 and "no such file" in result.stderr
    (tmp_path / "bad.yaml").write_text("steps:\n  - eval: {model: demo\n")
    result = invoke("recipe", "validate", tmp_path / "bad.yaml")
    assert result.exit_code == 2 and "not valid YAML" in result.stderr


# --------------------------------------------------------------------------------------------------------
# precedence: defaults < recipe < --set < explicit flags; --config < explicit flags


def _plan(steps, sets=(), flags=()):
    return plan_from_document({"steps": steps}, "test", sets=list(sets), flags=list(flags))


def test_precedence_default_recipe_set_flag():
    base = [{"decompose": {"model": "demo", "output": "out/x"}}, {"eval": {}}]
    assert _plan(base).steps[0].options["seq_len"] == 512  # default
    recipe = [{"decompose": {"model": "demo", "output": "out/x", "seq_len": 256, "sequential": False}},
              {"eval": {"seq_len": 256}}]
    assert _plan(recipe).steps[0].options["seq_len"] == 256
    plan = _plan(recipe, sets=["decompose.seq_len=128", "steps.0.decompose.sequential=true"])
    assert plan.steps[0].options["seq_len"] == 128 and plan.steps[0].options["sequential"] is True
    assert plan.steps[1].options["seq_len"] == 256  # --set on decompose leaves eval alone
    plan = _plan(recipe, sets=["decompose.seq_len=128", "decompose.sequential=true"],
                 flags=["--seq-len", "64", "--no-sequential"])
    assert plan.steps[0].options["seq_len"] == 64 and plan.steps[0].options["sequential"] is False
    assert plan.steps[1].options["seq_len"] == 64  # an explicit flag reaches every step that takes it


def test_set_values_are_yaml_typed():
    base = [{"decompose": {"model": "demo", "output": "out/x"}}, {"eval": {}}]
    plan = _plan(base, sets=["decompose.params_ratio=0.5", "eval.data=2024", "decompose.targets=mlp.*",
                             "steps.1.eval.streaming=yes", "decompose.data=null", "text_field=yes"])
    decompose, evaluate = plan.steps[0].options, plan.steps[1].options
    assert decompose["params_ratio"] == 0.5 and decompose["targets"] == "mlp.*" and decompose["data"] is None
    assert evaluate["data"] == "2024"  # a text option keeps the text
    assert evaluate["streaming"] is True
    assert decompose["text_field"] == evaluate["text_field"] == "yes"  # bare key: every step that has it
    with pytest.raises(RecipeInvalid) as info:
        _plan(base, sets=["decompose.params_ratio=lots", "steps.7.eval.seq_len=1", "quantize.bits=4",
                          "devise=cpu"], flags=["--devise", "cuda", "-q"])
    where = {p.where: p.message for p in info.value.problems}
    assert where["steps.0.decompose.params_ratio"].startswith("expected a number")
    assert "steps.N.key with N in 0..1" in where["--set steps.7.eval.seq_len"]
    assert where["--set quantize.bits"] == "this recipe has no 'quantize' step"
    assert "did you mean 'device'" in where["--set devise"]
    assert "did you mean '--device'" in where["--devise"]
    assert "put it before the command" in where["-q"]


def test_chaining_and_explicit_models():
    plan = _plan([{"decompose": {"model": "demo", "output": "out/a"}},
                  {"eval": {}},
                  {"eval": {"model": "demo"}},
                  {"decompose": {"output": "out/b", "rank": 8}},
                  {"eval": {}}])
    models = [s.options["model"] for s in plan.steps]
    assert models == ["demo", "out/a", "demo", "out/a", "out/b"]
    assert [s.model_from for s in plan.steps] == [None, 0, None, 0, 3]
    with pytest.raises(RecipeInvalid, match="1 problem") as info:
        _plan([{"decompose": {"model": "demo", "output": "out/a"}},
               {"decompose": {"output": "out/a", "rank": 8}}])
    assert info.value.problems[0].message == "steps.0 writes the same folder"


def test_config_file_below_explicit_flags(tiny_llama, tmp_path):
    config = tmp_path / "eval.yaml"
    config.write_text(f"model: {tiny_llama}\nseq_len: 32\nmax_tokens: 128\n")
    doc = json_of(invoke("eval", "--config", config, "--json"))
    assert doc["status"] == "ok" and doc["windows"] == 4 and doc["seq_len"] == 32  # config over defaults
    doc = json_of(invoke("eval", "--config", config, "--max-tokens", "64", "--json"))
    assert doc["windows"] == 2  # the explicit flag over the config
    doc = json_of(invoke("eval", str(tiny_llama), "--config", config, "--seq-len", "16", "--json"))
    assert doc["seq_len"] == 16 and doc["windows"] == 8


def test_config_file_errors_listed_at_once(tmp_path):
    config = tmp_path / "bad.json"
    config.write_text(json.dumps({"seq_lenn": 64, "max_tokens": "many", "devise": "cpu"}))
    proc = subprocess.run([sys.executable, "-m", "lowrank_cli", "eval", "demo", "--config", str(config), "--json"],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    message = json.loads(proc.stdout)["error"]["message"]
    assert message.splitlines() == [
        f"--config {config}: 3 problems",
        "  seq_lenn: unknown option for 'eval' (did you mean 'seq_len'?)",
        "  devise: unknown option for 'eval' (did you mean 'device'?)",
        "  max_tokens: expected an integer, got 'many'",
    ]
    assert "3 problems" in proc.stderr and "Traceback" not in proc.stderr


def test_config_takes_a_single_step_recipe(tiny_llama, tmp_path):
    recipe = write_recipe(tmp_path, [{"eval": {"model": str(tiny_llama), "seq_len": 32, "max_tokens": 96}}])
    doc = json_of(invoke("eval", "--config", recipe, "--json"))
    assert doc["windows"] == 3


def test_run_takes_config_too(tmp_path, monkeypatch):
    """`run` is hand-written (no options dataclass): its --config keys come from its own parameters."""
    monkeypatch.chdir(tmp_path)
    write_recipe(tmp_path, [{"eval": {"model": "demo", "seq_len": 32, "max_tokens": 64}}])
    (tmp_path / "c.yaml").write_text("recipe: r.yaml\ndry_run: true\nset: [eval.max_tokens=96]\n")
    result = invoke("run", "--config", tmp_path / "c.yaml")
    assert result.exit_code == 0, result.stderr
    assert "plan lowrank eval demo --seq-len 32 --max-tokens 96" in result.stderr
    (tmp_path / "c.yaml").write_text("recipe: r.yaml\ndry_rn: true\n")
    result = invoke("run", "--config", tmp_path / "c.yaml")
    assert result.exit_code == 2 and "did you mean 'dry_run'" in result.stderr


def test_every_command_takes_config():
    for name in [*command_specs(), "run"]:
        result = invoke(name, "--help")
        assert result.exit_code == 0 and "--config" in result.stdout, name


# --------------------------------------------------------------------------------------------------------
# running: skip, force, failure, provenance


def _tiny_recipe(folder: Path, model: Path, extra_steps=()) -> Path:
    return write_recipe(folder, [
        {"decompose": {"model": str(model), "output": "out/lord", **TINY_DECOMPOSE}},
        {"eval": {"seq_len": 32, "max_tokens": 64}},
        *extra_steps,
    ])


def test_run_chains_saves_the_resolved_recipe_and_skips_complete_steps(tiny_llama, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    recipe = _tiny_recipe(tmp_path, tiny_llama)
    first = invoke("run", recipe, "--json")
    doc = json_of(first)
    assert first.exit_code == 0, first.stderr
    assert [s["status"] for s in doc["steps"]] == ["ok", "ok"]
    lord, evaluated = doc["steps"][0]["result"], doc["steps"][1]["result"]
    assert evaluated["model"] == "out/lord" and evaluated["params"] == lord["params"]["model_after"]
    out = tmp_path / "out" / "lord"
    manifest = json.loads((out / "lowrank.json").read_text())
    assert manifest["argv"][1:3] == ["decompose", str(tiny_llama)]  # the step's own command line
    saved = yaml.safe_load((out / "recipe.yaml").read_text())
    assert saved["produced_by"]["step"] == 0
    assert saved["steps"][0]["decompose"]["params_ratio"] == 0.8
    assert saved["steps"][1]["eval"]["model"] == "out/lord"  # chaining made explicit
    assert not list(out.glob(".recipe.yaml.tmp-*"))
    assert load_plan(out / "recipe.yaml").document()["steps"] == saved["steps"]  # runnable as is

    stamp = (out / "lowrank.json").stat().st_mtime_ns
    again = json_of(invoke("run", recipe, "--json"))
    assert [s["status"] for s in again["steps"]] == ["skipped", "ok"]
    assert (out / "lowrank.json").stat().st_mtime_ns == stamp

    forced = json_of(invoke("run", recipe, "--force", "--json"))
    assert [s["status"] for s in forced["steps"]] == ["ok", "ok"]
    assert "--overwrite" in forced["steps"][0]["command_line"]
    assert (out / "lowrank.json").stat().st_mtime_ns != stamp

    changed = json_of(invoke("run", recipe, "--set", "decompose.params_ratio=0.6", "--json"))
    assert changed["steps"][0]["status"] == "ok"
    assert "params_ratio 0.8 -> 0.6" in changed["steps"][0]["reason"]
    assert yaml.safe_load((out / "recipe.yaml").read_text())["steps"][0]["decompose"]["params_ratio"] == 0.6


def test_failing_step_stops_the_run_with_its_code(tiny_llama, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    recipe = _tiny_recipe(tmp_path, tiny_llama, extra_steps=[
        {"eval": {"data": str(tmp_path / "missing.txt")}},  # fails: exit 2
        {"decompose": {"output": "out/never", "rank": 8}},
    ])
    result = invoke("run", recipe, "--json")
    assert result.exit_code == 2
    doc = json_of(result)
    assert doc["status"] == "error" and doc["exit_code"] == 2
    assert [s["status"] for s in doc["steps"]] == ["ok", "ok", "error", "not run"]
    assert doc["steps"][2]["exit_code"] == 2 and doc["steps"][2]["error"]["type"] == "usage"
    assert (tmp_path / "out" / "lord" / "lowrank.json").is_file()  # earlier output intact
    assert (tmp_path / "out" / "lord" / "recipe.yaml").is_file()
    assert not (tmp_path / "out" / "never").exists()
    assert sum(1 for ln in result.stderr.splitlines() if ln.startswith("error:")) == 2  # step's and run's


def test_budget_failure_propagates_exit_3(tmp_path, monkeypatch):
    """A budget that no compressed model can meet: decompose exits 3, and so does the run. On the trained demo
    model (a random one's perplexity moves either way under compression, so 0% can be met by chance)."""
    monkeypatch.chdir(tmp_path)
    recipe = write_recipe(tmp_path, [
        {"decompose": {"model": "demo", "output": "out/lord", "target_ppl_increase": "0%",
                       "calib_samples": 2, "seq_len": 32, "eval_tokens": 128, "search_steps": 1,
                       "rank_multiple": 1, "allocation": "uniform"}},
        {"eval": {}}])
    result = invoke("run", recipe)
    assert result.exit_code == 3, result.stderr
    assert "steps.0.decompose failed (exit 3)" in result.stderr


def test_existing_foreign_output_needs_force(tiny_llama, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "out" / "lord").mkdir(parents=True)
    (tmp_path / "out" / "lord" / "notes.txt").write_text("mine")
    recipe = _tiny_recipe(tmp_path, tiny_llama)
    result = invoke("run", recipe, "--dry-run")
    assert result.exit_code == 2 and "use --force" in result.stderr
    assert (tmp_path / "out" / "lord" / "notes.txt").read_text() == "mine"


def test_dry_run_writes_nothing_and_prints_the_plan(tiny_llama, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    recipe = _tiny_recipe(tmp_path, tiny_llama)
    result = invoke("run", recipe, "--dry-run")
    assert result.exit_code == 0, result.stderr
    assert f"lowrank decompose {tiny_llama} --output out/lord --params-ratio 0.8" in result.stderr
    assert "plan lowrank eval out/lord --seq-len 32 --max-tokens 64" in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.yaml"]


def test_chain_through_another_command(tiny_llama, tmp_path, monkeypatch):
    """decompose -> merge --dense -> eval: every output folder carries the resolved recipe."""
    assert "merge" in command_specs()  # part of this project: a lost registration fails, never skips
    monkeypatch.chdir(tmp_path)
    recipe = write_recipe(tmp_path, [
        {"decompose": {"model": str(tiny_llama), "output": "out/lord", **TINY_DECOMPOSE}},
        {"merge": {"output": "out/dense", "dense": True}},
        {"eval": {"seq_len": 32, "max_tokens": 64}}])
    result = invoke("run", recipe, "--json")
    doc = json_of(result)
    assert result.exit_code == 0, result.stderr
    lord, merged, evaluated = (s["result"] for s in doc["steps"])
    assert evaluated["model"] == "out/dense" and evaluated["params"] == lord["params"]["model_before"]
    for folder, index in (("lord", 0), ("dense", 1)):
        saved = yaml.safe_load((tmp_path / "out" / folder / "recipe.yaml").read_text())
        assert saved["produced_by"]["step"] == index
    assert yaml.safe_load((tmp_path / "out" / "dense" / "recipe.yaml").read_text())["steps"][1]["merge"][
        "model"] == "out/lord"


@pytest.mark.slow
def test_demo_recipe_end_to_end(tmp_path, monkeypatch):
    """The shipped demo recipe on the bundled model, made smaller through the command line."""
    monkeypatch.chdir(tmp_path)
    result = invoke("run", "demo", "--set", "decompose.calib_samples=4", "--set", "decompose.eval_tokens=512",
                    "--set", "eval.max_tokens=512", "--seq-len", "128", "--json")
    doc = json_of(result)
    assert result.exit_code == 0, result.stderr
    lord, evaluated = (s["result"] for s in doc["steps"])
    assert lord["params"]["targeted_ratio"] <= 0.8 + 1e-9
    assert evaluated["model"] == "out/demo-lord" and evaluated["tokens"] == 4 * 127
    assert evaluated["params"] == lord["params"]["model_after"] < lord["params"]["model_before"]
    assert 1 < evaluated["perplexity"] < 1.5 * lord["perplexity"]["baseline"]
    saved = yaml.safe_load((tmp_path / "out" / "demo-lord" / "recipe.yaml").read_text())
    assert saved["steps"][0]["decompose"]["seq_len"] == 128 and saved["steps"][1]["eval"]["max_tokens"] == 512


# --------------------------------------------------------------------------------------------------------
# lowrank recipe ls | show | validate


def test_recipe_ls_and_show():
    doc = json_of(invoke("recipe", "ls", "--json"))
    listed = {r["name"]: r for r in doc["recipes"]}
    assert set(listed) == set(SHIPPED)
    assert listed["demo"]["steps"] == ["decompose", "eval"]
    assert listed["lord-gptq4-qlora"]["steps"] == ["decompose", "quantize", "finetune"]
    shown = invoke("recipe", "show", "demo")
    assert shown.exit_code == 0 and shown.stdout == shipped()["demo"].read_text()
    resolved = invoke("recipe", "show", "demo", "--resolved", "--set", "decompose.params_ratio=0.7")
    doc = yaml.safe_load(resolved.stdout)
    assert doc["steps"][0]["decompose"]["params_ratio"] == 0.7
    assert doc["steps"][1]["eval"]["model"] == "out/demo-lord"
    assert invoke("recipe", "show", "no-such-recipe").exit_code == 2


def test_run_and_recipe_have_help_with_examples():
    for args in (["run", "--help"], ["recipe", "validate", "--help"]):
        result = invoke(*args)
        assert result.exit_code == 0 and "Examples" in result.stdout


# --------------------------------------------------------------------------------------------------------
# files that are not UTF-8: one line, exit 2, the JSON error object under --json

NOT_UTF8 = b"steps:\n  - eval: {model: demo, data: caf\xe9}\n"


@pytest.mark.parametrize("args", [["run", "{}"], ["recipe", "validate", "{}"], ["recipe", "show", "{}"],
                                  ["eval", "demo", "--config", "{}"]])
def test_non_utf8_recipe_or_config_is_one_line_exit_2(args, tmp_path):
    bad = tmp_path / "latin1.yaml"
    bad.write_bytes(NOT_UTF8)
    argv = [a.replace("{}", str(bad)) for a in args]
    for json_mode in (False, True):
        proc = subprocess.run([sys.executable, "-m", "lowrank_cli", *argv, *(["--json"] if json_mode else [])],
                              capture_output=True, text=True, cwd=tmp_path)
        assert proc.returncode == 2, proc.stderr
        assert "Traceback" not in proc.stderr
        lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
        assert len(lines) == 1 and "not UTF-8 text (byte 0xe9 at offset" in lines[0], proc.stderr
        if json_mode:
            doc = json.loads(proc.stdout)
            assert doc["status"] == "error" and doc["exit_code"] == 2 and "not UTF-8" in doc["error"]["message"]
        else:
            assert proc.stdout == ""


# --------------------------------------------------------------------------------------------------------
# recipes through the library: no sys.argv, no CLI state; the manifest records what the caller says


def test_recipe_steps_run_through_the_library_not_the_cli(tiny_llama, tmp_path, monkeypatch):
    """`execute` from Python: the host program's argv is neither read, changed nor recorded; each output's
    lowrank.json records the step's own command line."""
    from lowrank_cli.recipes.execute import execute

    monkeypatch.chdir(tmp_path)
    host_argv = ["host-program", "--host-secret"]
    monkeypatch.setattr(sys, "argv", host_argv)
    result = execute(load_plan(_tiny_recipe(tmp_path, tiny_llama)))
    assert sys.argv is host_argv and sys.argv == ["host-program", "--host-secret"]
    assert [s["status"] for s in result.steps] == ["ok", "ok"]
    manifest = json.loads((tmp_path / "out" / "lord" / "lowrank.json").read_text())
    assert manifest["argv"] == shlex.split(result.steps[0]["command_line"])
    assert manifest["argv"][:3] == ["lowrank", "decompose", str(tiny_llama)]
    assert result.steps[1]["result"]["model"] == "out/lord"


def test_library_call_records_no_host_argv(tiny_llama, tmp_path, monkeypatch):
    from lowrank_cli.api.decompose import DecomposeOptions, decompose
    from lowrank_cli.io.manifest import recording_command_line

    monkeypatch.setattr(sys, "argv", ["host-program", "--host-secret"])
    options = dict(params_ratio=0.8, calib_samples=2, calib_seq_len=32, eval_tokens=128)
    decompose(str(tiny_llama), DecomposeOptions(output=str(tmp_path / "a"), **options))
    assert json.loads((tmp_path / "a" / "lowrank.json").read_text())["argv"] is None
    with recording_command_line(["lowrank", "decompose", "x"]):
        decompose(str(tiny_llama), DecomposeOptions(output=str(tmp_path / "b"), **options))
    assert json.loads((tmp_path / "b" / "lowrank.json").read_text())["argv"] == ["lowrank", "decompose", "x"]


def test_cli_records_its_own_argv(tiny_llama, tmp_path, monkeypatch):
    argv = ["lowrank", "decompose", str(tiny_llama), "-o", str(tmp_path / "c"), "--params-ratio", "0.8",
            "--calib-samples", "2", "--seq-len", "32", "--eval-tokens", "128"]
    monkeypatch.setattr(sys, "argv", argv)
    result = invoke(*argv[1:])
    assert result.exit_code == 0, result.stderr
    assert json.loads((tmp_path / "c" / "lowrank.json").read_text())["argv"] == argv
