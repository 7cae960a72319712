"""The README's own commands, as written (issue 12): a doc/behaviour mismatch fails the suite.

- The first bash block: its `lowrank ...` command runs verbatim from a fresh empty folder (nothing exists
  there, not even `out/`), and must finish with exit 0 and a result that honours what the README says.
- Its install part (`pip install -e .`) must give every command the README shows: the core dependencies
  include what they import (peft for `lowrank finetune`).
- The test command's extras all exist in pyproject.toml and their packages import.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"


def bash_blocks() -> list[str]:
    return re.findall(r"```bash\n(.*?)```", README.read_text(encoding="utf-8"), re.S)


def commands(block: str) -> list[str]:
    return [part.strip() for part in block.replace("\\\n", " ").split("&&") if part.strip()]


def pyproject() -> dict:
    try:
        import tomllib
    except ImportError:  # Python 3.10
        tomllib = pytest.importorskip("tomli")
    return tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))


def lowrank_argv(command: str) -> list[str]:
    argv = shlex.split(command)
    assert argv[0] == "lowrank"
    script = shutil.which("lowrank")
    return ([script] if script else [sys.executable, "-m", "lowrank_cli"]) + argv[1:]


@pytest.mark.slow
def test_first_readme_command_runs_verbatim_in_a_fresh_folder(tmp_path):
    first = commands(bash_blocks()[0])
    runs = [c for c in first if c.startswith("lowrank ")]
    assert runs == ["lowrank compress demo --target-ppl-increase 5% -o out/demo-small"], first
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run(lowrank_argv(runs[0]), cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=1800)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = tmp_path / "out" / "demo-small"
    assert (out / "config.json").is_file() and (out / "lowrank.json").is_file()
    assert (out / "frontier.png").is_file()  # "writes it with frontier.json and frontier.png"
    frontier = json.loads((out / "frontier.json").read_text())
    chosen = next(r for r in frontier["candidates"] if r["label"] == frontier["chosen"])
    assert chosen["eval_increase"] <= 0.05  # "at most 5% above the original's" (held-out code, eval part)
    assert chosen["bytes"] < frontier["baseline"]["bytes"] / 3  # and much smaller
    gptq4 = next(r for r in frontier["candidates"] if r["label"] == "gptq-4bit")
    assert chosen["bytes"] < gptq4["bytes"]  # smaller than `lowrank quantize demo` (4-bit alone)
    # read back by plain transformers, on text the project never uses (typer's and rich's own sources): a
    # budget holds on the kind of text it was measured on; on another kind the increase was measured at
    # +10.7% (GPTQ 2-bit picked at eval +4.3%), so the slack for another text is 2.5x the budget
    assert _never_used_text_increase(out) <= 2.5 * 0.05
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temp, lock or log files left


def test_readme_install_gives_every_command_its_dependencies():
    install = [c for c in commands(bash_blocks()[0]) if c.startswith("pip install")]
    assert "pip install -e ." in install
    core = " ".join(pyproject()["project"]["dependencies"])
    assert "peft" in core  # `lowrank finetune` (shown in the README) imports it


def test_readme_test_command_extras_exist_and_import():
    test_cmd = bash_blocks()[1]
    assert "python -m pytest -q" in test_cmd
    extras = re.search(r'-e "\.\[([^\]]+)\]"', test_cmd).group(1).split(",")
    declared = pyproject()["project"]["optional-dependencies"]
    missing = [e for e in extras if e not in declared]
    assert not missing, f"README's test command names extras pyproject.toml lacks: {missing}"
    modules = {"pytest": "pytest", "peft": "peft", "matplotlib": "matplotlib", "gptqmodel": "gptqmodel",
               "optimum": "optimum", "bitsandbytes": "bitsandbytes", "datasets": "datasets",
               "pyarrow": "pyarrow", "scipy": "scipy", "ruff": None}
    for extra in extras:
        for requirement in declared[extra]:
            name = re.match(r"[A-Za-z0-9_.\-]+", requirement).group(0).lower()
            module = modules.get(name, name.replace("-", "_"))
            if module is not None:
                assert importlib.util.find_spec(module) is not None, f"{requirement} (extra {extra}) not importable"


def _never_used_text_increase(folder) -> float:
    """Perplexity increase of `folder` over the demo model, both loaded by transformers (gptqmodel and
    remote code where the folder needs them), on 16 windows of typer's and rich's source files."""
    import glob
    import math

    import rich
    import torch
    import typer
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import lowrank_cli

    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")
    demo = Path(lowrank_cli.__file__).parent / "demo_model"
    files = sorted(glob.glob(str(Path(typer.__file__).parent / "*.py")) + glob.glob(str(Path(rich.__file__).parent
                                                                                        / "*.py")))
    text = "\n\n".join(Path(f).read_text(encoding="utf-8") for f in files[:60])
    ids = AutoTokenizer.from_pretrained(demo)(text, return_tensors="pt").input_ids[0][: 16 * 512]
    windows = ids[: ids.numel() // 512 * 512].view(-1, 512)
    assert windows.shape[0] == 16

    def perplexity(model) -> float:
        with torch.no_grad():
            losses = [model(w[None], labels=w[None]).loss.double().item() for w in windows]
        return math.exp(sum(losses) / len(losses))

    base = perplexity(AutoModelForCausalLM.from_pretrained(demo, dtype=torch.float32))
    small = perplexity(AutoModelForCausalLM.from_pretrained(folder, device_map="cpu", trust_remote_code=True))
    return small / base - 1
