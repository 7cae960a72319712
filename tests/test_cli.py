"""The CLI end to end: help, version, exit codes, the one-JSON-object contract, one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest
from typer.testing import CliRunner

from lowrank_cli.cli.app import app

runner = CliRunner()
COMMANDS = ["eval", "decompose", "env"]


def invoke(*args):
    return runner.invoke(app, list(args), catch_exceptions=False)


def test_version():
    from lowrank_cli import __version__

    result = invoke("--version")
    assert result.exit_code == 0
    assert __version__ in result.stdout


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help_with_examples(command):
    result = invoke(command, "--help")
    assert result.exit_code == 0
    assert "Examples" in result.stdout
    assert "--json" in result.stdout


def test_help_is_fast_and_imports_no_torch():
    code = ("import sys, time; t=time.time(); from lowrank_cli.cli.app import app; "
            "print('torch' in sys.modules, time.time()-t)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    imported_torch, seconds = out.stdout.split()
    assert imported_torch == "False"
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "lowrank_cli", "--help"], capture_output=True, text=True)
    assert proc.returncode == 0 and "decompose" in proc.stdout
    assert time.perf_counter() - start < 5  # about a second on an idle machine; generous for CI noise


def run_json(*args):
    result = runner.invoke(app, [*args, "--json"])
    lines = [ln for ln in result.stdout.splitlines() if ln.strip()]
    assert len(lines) == 1, f"expected exactly one JSON line, got: {result.stdout!r}"
    return result.exit_code, json.loads(lines[0]), result


def test_env_json():
    code, doc, _ = run_json("env")
    assert code == 0
    assert doc["status"] == "ok" and doc["command"] == "env"
    assert doc["versions"]["torch"].startswith("2.")
    assert "cuda_available" in doc


def test_eval_json(tiny_llama):
    code, doc, _ = run_json("eval", str(tiny_llama), "--seq-len", "32", "--max-tokens", "128")
    assert code == 0
    assert doc["status"] == "ok"
    assert doc["windows"] == 4 and doc["tokens"] == 4 * 31
    assert doc["perplexity"] > 1


def test_eval_streaming_matches_full(tiny_bigcode):
    _, full, _ = run_json("eval", str(tiny_bigcode), "--seq-len", "32", "--max-tokens", "96")
    _, streamed, _ = run_json("eval", str(tiny_bigcode), "--seq-len", "32", "--max-tokens", "96",
                              "--streaming")
    assert streamed["mode"] == "streamed"
    assert streamed["perplexity"] == pytest.approx(full["perplexity"], rel=1e-5)


def _corrupt(src, dst):
    import shutil

    shutil.copytree(src, dst)
    shard = sorted(dst.glob("*.safetensors"))[0]
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    return dst


@pytest.mark.parametrize("case", ["missing", "no_config", "corrupt", "hub_offline", "seq_len_0",
                                  "no_tokens", "bad_device"])
def test_eval_bad_input_exits_2_with_one_line(case, tiny_llama, tmp_path):
    model, extra = str(tiny_llama), []
    if case == "missing":
        model = str(tmp_path / "nope")
    elif case == "no_config":
        (tmp_path / "empty").mkdir()
        model = str(tmp_path / "empty")
    elif case == "corrupt":
        model = str(_corrupt(tiny_llama, tmp_path / "corrupt"))
    elif case == "hub_offline":
        model = "nobody-xyz/not-a-model"
    elif case == "seq_len_0":
        extra = ["--seq-len", "0"]
    elif case == "no_tokens":
        (tmp_path / "blank.txt").write_text("   \n\n ")
        extra = ["--data", str(tmp_path / "blank.txt")]
    elif case == "bad_device":
        extra = ["--device", "tpu"]
    code, doc, result = run_json("eval", model, *extra)
    assert code == 2, result.stderr
    assert doc["status"] == "error" and doc["exit_code"] == 2
    errors = [ln for ln in result.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1
    assert "Traceback" not in result.stderr


def test_unknown_option_is_usage_error_with_json():
    proc = subprocess.run([sys.executable, "-m", "lowrank_cli", "eval", "demo", "--bogus", "--json"],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    doc = json.loads(proc.stdout.strip().splitlines()[-1])
    assert doc["status"] == "error"


def test_verbose_shows_traceback(tmp_path):
    result = runner.invoke(app, ["-v", "eval", str(tmp_path / "nope")])
    assert result.exit_code == 2
    assert "Traceback" in result.stderr


def test_no_progress_or_logs_on_stdout_in_pipes(tiny_llama):
    proc = subprocess.run([sys.executable, "-m", "lowrank_cli", "eval", str(tiny_llama), "--seq-len", "32",
                           "--max-tokens", "64", "--json"], capture_output=True, text=True)
    assert proc.returncode == 0
    assert len(proc.stdout.strip().splitlines()) == 1
    assert proc.stderr.strip() == ""


def test_demo_is_a_real_language_model():
    """The bundled model predicts held-out stdlib code far better than token frequencies alone (its
    training figures: ppl 49.75 against a unigram 687 on 131k held-out tokens)."""
    code, doc, _ = run_json("eval", "demo", "--seq-len", "256", "--max-tokens", "2048")
    assert code == 0
    assert 5 < doc["perplexity"] < 200
    assert doc["params"] == 3_878_656
