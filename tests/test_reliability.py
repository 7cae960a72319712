"""Reliability and security (issue 12): output folders that no run loses or shares, signals, training
checkpoints that never unpickle, bad input that exits 2 with one line, file modes, platform-neutral memory
figures, weight-sensitive fingerprints."""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from lowrank_cli.cli.app import app
from lowrank_cli.errors import UsageError
from lowrank_cli.io.output import OutputDir, check_output_target, release_locks

runner = CliRunner()
REPO = Path(__file__).resolve().parents[1]


def cli_json(*args):
    result = runner.invoke(app, [*map(str, args), "--json"])
    lines = [ln for ln in result.stdout.splitlines() if ln.strip()]
    assert len(lines) == 1, f"expected one JSON line: {result.stdout!r} {result.stderr!r}"
    return result.exit_code, json.loads(lines[0]), result


def python_env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def start_script(code: str, *args) -> subprocess.Popen:
    """A Python child that prints 'ready' once it holds what the test needs."""
    proc = subprocess.Popen([sys.executable, "-c", textwrap.dedent(code), *map(str, args)], env=python_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    assert line.strip() == "ready", (line, proc.stderr.read() if proc.poll() is not None else "")
    return proc


# ------------------------------------------------------------------------------------------ output folders


def test_missing_parent_folders_are_created(tmp_path):
    target = tmp_path / "a" / "b" / "c"
    out = OutputDir(target)
    with out as tmp:
        (tmp / "x.txt").write_text("x")
        out.commit()
    assert (target / "x.txt").read_text() == "x"
    assert sorted(p.name for p in (tmp_path / "a" / "b").iterdir()) == ["c"]  # no lock or temp left


def test_parents_made_for_a_run_that_wrote_nothing_are_removed(tmp_path):
    with pytest.raises(RuntimeError), OutputDir(tmp_path / "a" / "b" / "c"):
        raise RuntimeError("fails")
    assert list(tmp_path.iterdir()) == []


def test_target_changed_during_the_run_is_not_replaced(tmp_path):
    """Issue 12 item 2: a folder that appears while the run computes survives, and the result is kept."""
    target = tmp_path / "late"
    out = OutputDir(target)
    with pytest.raises(UsageError) as excinfo, out as tmp:
        (tmp / "model.safetensors").write_text("new")
        target.mkdir()
        (target / "precious.txt").write_text("mine")
        out.commit()
    message = str(excinfo.value)
    assert "\n" not in message and "--overwrite" in message
    kept = tmp_path / f"late.new-{os.getpid()}"
    assert str(kept) in message
    assert (target / "precious.txt").read_text() == "mine" and sorted(p.name for p in target.iterdir()) == [
        "precious.txt"]
    assert (kept / "model.safetensors").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["late", kept.name]


def test_target_changed_during_the_run_is_replaced_with_overwrite(tmp_path):
    target = tmp_path / "late"
    out = OutputDir(target, overwrite=True)
    with out as tmp:
        (tmp / "model.safetensors").write_text("new")
        target.mkdir()
        (target / "old.txt").write_text("old")
        out.commit()
    assert sorted(p.name for p in target.iterdir()) == ["model.safetensors"]


HOLDER = """
import sys, time
from lowrank_cli.io.output import OutputDir
out = OutputDir(sys.argv[1])
tmp = out.__enter__()
(tmp / "partial.safetensors").write_bytes(b"x" * 1000)
print("ready", flush=True)
time.sleep(120)
"""


def test_two_runs_cannot_write_one_output_and_a_killed_runs_leftovers_go(tmp_path, monkeypatch):
    target = tmp_path / "out"
    holder = start_script(HOLDER, target)
    try:
        stale = tmp_path / f".out.tmp-{holder.pid}"
        assert stale.is_dir()
        with pytest.raises(UsageError, match=f"being written by another lowrank run \\(pid {holder.pid}\\)"):
            check_output_target(target, overwrite=False)
        # the CLI refuses before any compute, with one line and exit 2
        code, doc, result = cli_json("decompose", "demo", "--params-ratio", "0.8", "-o", target)
        assert code == 2 and "another lowrank run" in doc["error"]["message"]
        assert result.stderr.count("\n") == 1
    finally:
        holder.kill()  # SIGKILL: no cleanup of its own
        holder.communicate()
    assert stale.is_dir()  # what a killed run leaves
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    monkeypatch.setattr(logging.getLogger("lowrank"), "handlers", [handler])  # the CLI run's handler is closed
    out = OutputDir(target)
    assert not stale.exists()
    assert any(stale.name in r.getMessage() and "interrupted run" in r.getMessage() for r in records)
    with out as tmp:
        (tmp / "a.txt").write_text("a")
        out.commit()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_output_that_cannot_be_written_is_refused_before_any_compute(tmp_path, monkeypatch):
    """Issue 12 item 6. As root, a chmod'ed folder is still writable: /sys is not, for anyone."""
    if os.geteuid() != 0:
        parent = tmp_path / "ro"
        parent.mkdir()
        parent.chmod(0o555)
    else:
        parent = Path("/sys")
        if os.access(parent, os.W_OK) and not parent.is_mount():
            pytest.skip("no unwritable folder available")
    from lowrank_cli.api import decompose as api_decompose

    def must_not_run(*args, **kwargs):
        raise AssertionError("compute started")

    monkeypatch.setattr(api_decompose._Job, "run", must_not_run)
    code, doc, _ = cli_json("decompose", "demo", "--params-ratio", "0.8", "-o", parent / "lowrank-test-out")
    assert code == 2 and "cannot write" in doc["error"]["message"], doc
    assert not (parent / "lowrank-test-out").exists()


TERMINATED = """
import os, sys, time
import typer
from lowrank_cli.cli.runner import run
from lowrank_cli.io.output import OutputDir

# the runner sends a job's stdout to stderr (stdout carries only the result): signal on a copy of fd 1
ready = os.fdopen(os.dup(1), "w")

def job(progress):
    with OutputDir(sys.argv[1]) as tmp:
        (tmp / "partial.safetensors").write_bytes(b"x" * 1000)
        print("ready", file=ready, flush=True)
        time.sleep(120)

try:
    run("decompose", job, json_mode=False)
except typer.Exit as exc:
    sys.exit(exc.exit_code)
"""


def test_sigterm_exits_143_and_removes_the_temporary_folder(tmp_path):
    """Issue 12 item 3: CI cancellation, timeouts and `docker stop` send SIGTERM."""
    proc = start_script(TERMINATED, tmp_path / "out")
    assert (tmp_path / f".out.tmp-{proc.pid}").is_dir()
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err
    assert err.strip().splitlines() == ["error: terminated (SIGTERM)"]
    assert list(tmp_path.iterdir()) == []


def test_a_signal_during_commit_waits_until_the_new_folder_is_in_place(tmp_path, monkeypatch):
    target = tmp_path / "out"
    target.mkdir()
    (target / "old.txt").write_text("old")

    class Stop(Exception):
        pass

    def stop(signum, frame):
        raise Stop

    previous = signal.signal(signal.SIGTERM, stop)
    real_replace = os.replace

    def replace_then_signal(src, dst):
        real_replace(src, dst)
        os.kill(os.getpid(), signal.SIGTERM)  # arrives between moving the old folder out and the new one in

    try:
        out = OutputDir(target, overwrite=True)
        with pytest.raises(Stop), out as tmp:
            (tmp / "new.txt").write_text("new")
            monkeypatch.setattr(os, "replace", replace_then_signal)
            out.commit()
    finally:
        monkeypatch.undo()
        signal.signal(signal.SIGTERM, previous)
    assert sorted(p.name for p in target.iterdir()) == ["new.txt"]  # delivered once the commit was whole
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


# ------------------------------------------------------------------------------------------ file modes


def test_written_files_are_readable_by_others(tmp_path):
    """Issue 12 item 8: mkstemp and safetensors write 0600; outputs get what a plain open() gives."""
    from safetensors.torch import save_file

    from lowrank_cli.modeling.export import write_modeling_file

    umask = os.umask(0o022)
    try:
        out = OutputDir(tmp_path / "out")
        with out as tmp:
            save_file({"a": torch.zeros(2)}, str(tmp / "adapter_model.safetensors"))
            write_modeling_file(tmp, "llama")
            (tmp / "sub").mkdir()
            save_file({"a": torch.zeros(2)}, str(tmp / "sub" / "x.safetensors"))
            out.commit()
        solo = write_modeling_file(tmp_path / "solo", "llama")  # the save_pretrained hook's path
    finally:
        os.umask(umask)
    files = [p for p in (tmp_path / "out").rglob("*") if p.is_file()] + [solo]
    assert len(files) == 4
    assert {oct(p.stat().st_mode & 0o777) for p in files} == {"0o644"}


# ------------------------------------------------------------------------------------------ training checkpoints


class Payload:
    """Unpickling this creates the marker file: proof that the pickle ran code."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def plant(path: Path, marker: Path) -> None:
    torch.save(Payload(marker), path)


FT = ["--max-steps", "2", "--batch-size", "2", "--max-seq-len", "32", "--save-every", "1", "--warmup", "1"]


@pytest.fixture(scope="module")
def trained(tiny_llama, tmp_path_factory):
    """A finetune run's checkpoint folder (step-000001) and the data it used."""
    root = tmp_path_factory.mktemp("ckpt")
    data = root / "qa.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"say {w} {i}:", "completion": f" {w} {w}"}) + "\n"
                            for i in range(4) for w in ("alpha", "beta", "gamma", "delta")))
    code, doc, result = cli_json("finetune", tiny_llama, "--data", data, *FT, "-o", root / "a",
                                 "--checkpoint-dir", root / "ck")
    assert code == 0, result.output
    step = root / "ck" / "step-000001"
    assert {"rng_state_0.safetensors", "loop_state.json", "model.safetensors"} <= {p.name for p in step.iterdir()}
    assert not list(step.glob("*.pt"))  # nothing of ours is a pickle
    return root, data


@pytest.mark.parametrize("case", ["old-rng", "callbacks", "optimizer", "accelerate-rng"])
def test_resume_never_runs_code_from_a_checkpoint(case, trained, tiny_llama, tmp_path):
    """Issue 12 item 1: a checkpoint folder from elsewhere must not execute code on --resume."""
    root, data = trained
    ck = tmp_path / "ck"
    shutil.copytree(root / "ck", ck)
    step = ck / "step-000001"
    marker = tmp_path / "pwned"
    if case == "old-rng":  # the pickle an older lowrank wrote, in place of our safetensors file
        (step / "rng_state_0.safetensors").unlink()
        plant(step / "rng_state_0.pt", marker)
    elif case == "callbacks":
        plant(step / "callbacks.pt", marker)
    elif case == "optimizer":
        plant(step / "optimizer.bin", marker)
    else:
        plant(step / "random_states_0.pkl", marker)
    code, doc, result = cli_json("finetune", tiny_llama, "--data", data, *FT, "-o", tmp_path / "b",
                                 "--checkpoint-dir", ck, "--resume")
    assert not marker.exists(), "the planted pickle ran"
    if case in ("old-rng", "optimizer"):  # the state it needs is refused, in one line
        assert code == 2 and "--resume" in doc["error"]["message"], doc
        assert not (tmp_path / "b").exists()
    else:  # files lowrank does not read (accelerate's RNG pickle is read with weights_only and rejected)
        assert code == 0 and doc["resumed_from_step"] == 1, result.output


def test_rng_and_callback_state_round_trip_without_pickle(tmp_path):
    import random

    import numpy as np

    from lowrank_cli.train.state_io import (
        load_callback_states,
        load_rng_states,
        save_callback_states,
        save_rng_states,
    )

    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    np.random.normal()  # a cached gaussian is part of numpy's state
    save_rng_states(tmp_path / "rng.safetensors")
    want = (random.random(), np.random.normal(), torch.rand(3))
    random.seed(9)
    np.random.seed(9)
    torch.manual_seed(9)
    load_rng_states(tmp_path / "rng.safetensors")
    got = (random.random(), np.random.normal(), torch.rand(3))
    assert want[0] == got[0] and want[1] == got[1] and torch.equal(want[2], got[2])

    states = [{"history": [{"step": 1, "ranks": {"a": 3}}], "seconds": 1.5, "m": torch.arange(4.0)}, {}]
    save_callback_states(states, tmp_path)
    back = load_callback_states(tmp_path)
    assert back[0]["history"] == states[0]["history"] and back[0]["seconds"] == 1.5 and back[1] == {}
    assert torch.equal(back[0]["m"], states[0]["m"])
    with pytest.raises(TypeError, match="set"):
        save_callback_states([{"x": {1, 2}}], tmp_path)


# ------------------------------------------------------------------------------------------ bad input, exit 2


def test_non_utf8_config_is_one_line_exit_2_with_json(tmp_path):
    """Issue 12 item 4."""
    bad = tmp_path / "bad.yaml"
    bad.write_bytes(b"params_ratio: 0.8\n# \xff\xfe latin-1 comment\n")
    proc = subprocess.run([sys.executable, "-m", "lowrank_cli", "decompose", "demo", "--config", str(bad),
                           "-o", str(tmp_path / "o"), "--json"], env=python_env(), capture_output=True, text=True,
                          timeout=120, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["status"] == "error" and "not UTF-8" in doc["error"]["message"]
    assert "Traceback" not in proc.stderr
    recipe = tmp_path / "r.yaml"
    recipe.write_bytes(b"steps:\n  - eval: {model: demo}\n# \xff\n")
    code, doc, _ = cli_json("run", recipe)
    assert code == 2 and doc["status"] == "error"


def test_shard_header_not_matching_its_byte_span(tiny_llama, tmp_path):
    """Issue 12 item 5: a header whose shape/dtype disagrees with its byte span names the file (exit 2)."""
    import struct

    folder = tmp_path / "m"
    shutil.copytree(tiny_llama, folder)
    shard = sorted(folder.glob("*.safetensors"))[0]
    raw = shard.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + length])
    name = next(k for k in header if k != "__metadata__")
    header[name]["dtype"] = "F16" if header[name]["dtype"] != "F16" else "F32"  # half or twice the bytes
    text = json.dumps(header, separators=(",", ":")).encode()
    assert len(text) <= length
    text += b" " * (length - len(text))  # same header length: only the dtype is wrong
    shard.write_bytes(raw[:8] + text + raw[8 + length:])
    code, doc, result = cli_json("eval", folder, "--max-tokens", "64", "--seq-len", "32")
    assert code == 2, result.output
    assert shard.name in doc["error"]["message"] and name in doc["error"]["message"]


def test_eval_seq_len_beyond_the_model_positions():
    """Issue 12 item 5: the demo has 512 positions."""
    code, doc, result = cli_json("eval", "demo", "--seq-len", "4096")
    assert code == 2 and "512 positions" in doc["error"]["message"]
    assert result.stderr.count("\n") == 1


def test_binary_file_as_training_text_is_refused(tmp_path):
    """Issue 12 item 9."""
    import random

    from lowrank_cli.data.sources import load_documents

    blob = tmp_path / "data.txt"
    blob.write_bytes(random.Random(0).randbytes(20000))
    with pytest.raises(UsageError, match="does not look like text"):
        load_documents(str(blob))
    code, doc, _ = cli_json("finetune", "demo", "--data", blob, "--max-steps", "1", "-o", tmp_path / "o")
    assert code == 2 and "does not look like text" in doc["error"]["message"]
    prose = tmp_path / "prose.txt"
    prose.write_text("Plain text, with an accent: café. Tabs\tand newlines\n" * 50)
    assert load_documents(str(prose))


@pytest.mark.parametrize("record", [{"text": 42}, {"text": ["a"]}, {"prompt": "q", "completion": 7}])
def test_non_string_text_records_are_refused(record, tmp_path):
    """Issue 12 item 9: not silently str()'d or dropped."""
    from lowrank_cli.data.sources import load_documents
    from lowrank_cli.train.data import load_records

    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"text": "fine"}) + "\n" + json.dumps(record) + "\n")
    with pytest.raises(UsageError, match=r"d.jsonl:2: '(text|completion)' must be a string"):
        load_records(str(data))
    if "text" in record:
        with pytest.raises(UsageError, match="must be a string"):
            load_documents(str(data))


# ------------------------------------------------------------------------------------------ softer items


def test_finetune_of_a_dense_model_does_not_import_gptqmodel(tiny_llama, tmp_path):
    """Issue 12 item 9: gptqmodel's banner and environment notes must not appear for a dense model."""
    pytest.importorskip("gptqmodel")
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"text": f"line {i} of text"}) + "\n" for i in range(30)))
    code = textwrap.dedent(f"""
        import sys
        from lowrank_cli.cli.app import main
        sys.argv = ["lowrank", "finetune", {str(tiny_llama)!r}, "--data", {str(data)!r}, "--max-steps", "1",
                    "--max-seq-len", "16", "-o", {str(tmp_path / "o")!r}]
        try:
            main()
        except SystemExit as exc:
            print("gptqmodel imported:", "gptqmodel" in sys.modules, file=sys.stderr)
            raise
    """)
    proc = subprocess.run([sys.executable, "-c", code], env=python_env(), capture_output=True, text=True,
                          timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "gptqmodel imported: False" in proc.stderr
    assert "GPT-QModel" not in proc.stderr and "GIL" not in proc.stderr


MEMORY_USERS = ("lowrank_cli.train.loop", "lowrank_cli.api.quantize", "lowrank_cli.api.decompose",
                "lowrank_cli.api.compress_job")


def test_peak_rss_bytes_is_bytes_on_every_platform(monkeypatch):
    """Issue 12 item 9: no module imports `resource` at the top (Windows); macOS reports bytes."""
    import builtins
    import importlib

    from lowrank_cli.utils import memory

    rss = memory.peak_rss_bytes()
    assert 50 * 2**20 < rss < 64 * 2**30  # this process holds torch: tens of MiB at least
    import resource

    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    monkeypatch.setattr(sys, "platform", "darwin")
    assert memory.peak_rss_bytes() == pytest.approx(kib, rel=0.5)  # macOS: ru_maxrss is already bytes
    monkeypatch.setattr(sys, "platform", "win32")
    real_import = builtins.__import__

    def no_resource(name, *args, **kwargs):
        if name == "resource":
            raise ImportError("no resource on Windows")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_resource)
    assert memory.peak_rss_bytes() > 50 * 2**20  # psutil's figure
    for module in MEMORY_USERS:
        sys.modules.pop(module, None)
        importlib.import_module(module)  # imports without `resource`
    monkeypatch.undo()
    for module in MEMORY_USERS:
        sys.modules.pop(module, None)
        importlib.import_module(module)
    grep = [p for p in (REPO / "lowrank_cli").rglob("*.py") if "ru_maxrss" in p.read_text()]
    assert grep == [REPO / "lowrank_cli" / "utils" / "memory.py"]


def test_fingerprint_covers_the_weights(tiny_llama, tmp_path):
    """Issue 12 item 9: two models of one architecture (same headers and sizes) must differ."""
    from safetensors.torch import load_file, save_file

    from lowrank_cli.io.checkpoint import Checkpoint

    folder = tmp_path / "m"
    shutil.copytree(tiny_llama, folder)
    first = Checkpoint(folder).fingerprint()
    for shard in sorted(folder.glob("*.safetensors")):
        tensors = load_file(str(shard))
        name = max(tensors, key=lambda k: tensors[k].numel())
        tensors[name] = tensors[name] + 1e-3  # a "fine-tune": same names, dtypes, shapes, offsets
        save_file(tensors, str(shard), metadata={"format": "pt"})
        break
    assert Checkpoint(folder).fingerprint() != first
    assert Checkpoint(folder).fingerprint() == Checkpoint(folder).fingerprint()


def test_finetune_eval_budget_is_sized_to_the_run():
    from lowrank_cli.api.finetune import FinetuneOptions

    assert FinetuneOptions(max_steps=3).eval_examples() == 8  # 12 training examples: eval a handful
    assert FinetuneOptions(max_steps=400).eval_examples() == 200
    assert FinetuneOptions(max_steps=10_000).eval_examples() == 256
    assert FinetuneOptions().eval_examples() == 256  # an epoch run
    assert FinetuneOptions(max_steps=3, max_eval_examples=40).eval_examples() == 40


def test_release_locks_leaves_no_lock_files(tmp_path):
    check_output_target(tmp_path / "x", overwrite=False)
    assert (tmp_path / ".x.lock").is_file()
    release_locks()
    assert list(tmp_path.iterdir()) == []


def test_no_committed_tool_logs():
    """Issue 12 item 10: gptqmodel's ./logs is ignored, and none is committed."""
    ignored = (REPO / ".gitignore").read_text().split()
    assert "logs/" in ignored
    if (REPO / ".git").exists() and shutil.which("git"):
        tracked = subprocess.run(["git", "ls-files", "logs"], cwd=REPO, capture_output=True, text=True).stdout
        assert tracked == ""


def test_no_comment_points_outside_the_repository():
    """Issue 12 item 10: tests and benchmarks state facts in place, not by citing design notes elsewhere."""
    cited = [p for folder in ("tests", "benchmarks") for p in (REPO / folder).rglob("*.py")
             if "shared/" + "design" in p.read_text()]
    assert cited == []


def test_gptqmodel_logs_go_to_a_temporary_folder():
    pytest.importorskip("gptqmodel")
    from gptqmodel.looper import loop_processor

    from lowrank_cli.utils.third_party import gptqmodel_logs_elsewhere

    before = loop_processor._PROJECT_LOG_DIR
    with gptqmodel_logs_elsewhere() as folder:
        assert loop_processor.LoopProcessor._build_log_file_path("gptq", "t").parent == folder
    assert loop_processor._PROJECT_LOG_DIR == before and not folder.exists()
