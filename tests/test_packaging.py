"""The wheel: the top-level recipes/ folder ships inside the package, and a non-editable install finds it."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted(p.name for p in (ROOT / "recipes").glob("*.yaml"))


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """Built from a copy of the sources (setuptools writes build/ and *.egg-info next to them)."""
    out = tmp_path_factory.mktemp("wheel")
    source = out / "source"
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(
        ".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache", "out", "results"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(source), "-w", str(out), "--no-deps",
                    "--no-build-isolation", "-q"], check=True, capture_output=True, cwd=out)
    (found,) = out.glob("lowrank_cli-*.whl")
    return found


def test_recipes_live_at_the_top_level():
    assert {"demo.yaml", "lord-gptq4-qlora.yaml", "starcoder-lord-1pct.yaml", "trp-small.yaml"} <= set(RECIPES)
    assert not list((ROOT / "lowrank_cli").rglob("*.yaml"))  # none hidden inside the package sources


def test_wheel_carries_the_recipes_and_no_tests(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    assert sorted(n.rsplit("/", 1)[1] for n in names if n.startswith("lowrank_cli/recipes/shipped/")) == RECIPES
    assert not [n for n in names if n.startswith(("tests/", "recipes/", "benchmarks/"))]
    record = next(n for n in names if n.endswith(".dist-info/RECORD"))
    assert "lowrank_cli/recipes/shipped/demo.yaml" in zipfile.ZipFile(wheel).read(record).decode()


def test_installed_wheel_lists_and_runs_its_recipes(wheel, tmp_path):
    """A non-editable install (pip --target, dependencies from this environment), run outside the checkout."""
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
                   check=True, capture_output=True)
    env = {**os.environ, "PYTHONPATH": str(target)}
    proc = subprocess.run([sys.executable, "-m", "lowrank_cli", "recipe", "ls", "--json"], capture_output=True,
                          text=True, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    listed = json.loads(proc.stdout)["recipes"]
    assert sorted(f"{r['name']}.yaml" for r in listed) == RECIPES
    assert all(Path(r["path"]).is_relative_to(target) for r in listed)
    proc = subprocess.run([sys.executable, "-m", "lowrank_cli", "recipe", "validate", "demo"], capture_output=True,
                          text=True, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
