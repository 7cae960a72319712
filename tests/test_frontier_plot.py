"""frontier.png: the Pareto set against a brute-force reference, and a PNG that decodes."""

from __future__ import annotations

import random

import pytest

from lowrank_cli.utils.frontier_plot import frontier_figure, pareto_indices, write_frontier_png

CANDIDATES = [
    {"family": "gptq", "label": "gptq 8-bit", "bytes": 180e6, "test_ppl": 10.05, "passed": True},
    {"family": "gptq", "label": "gptq 4-bit", "bytes": 100e6, "test_ppl": 10.9, "passed": False},
    {"family": "gptq", "label": "gptq 3-bit", "bytes": 85e6, "test_ppl": 12.5, "passed": False},
    {"family": "factorize+gptq", "label": "0.8 + 4-bit", "bytes": 90e6, "test_ppl": 10.6, "passed": False},
    {"family": "factorize+gptq", "label": "0.9 + 8-bit", "bytes": 150e6, "test_ppl": 10.08, "passed": True,
     "chosen": True},
    {"family": "gptq+lowrank", "label": "4-bit + r32", "bytes": 110e6, "test_ppl": 10.7, "passed": False},
    {"family": "factorize", "label": "0.9 16-bit", "bytes": 240e6, "test_ppl": 10.3, "passed": False},
]


def brute_force_front(points):
    """Sort by bytes, keep what strictly improves on the best perplexity so far (ties on both: kept)."""
    out, best = [], float("inf")
    for i in sorted(range(len(points)), key=lambda i: (points[i]["bytes"], points[i]["test_ppl"])):
        p = points[i]
        if p["test_ppl"] < best or (out and (p["bytes"], p["test_ppl"]) == (points[out[-1]]["bytes"], best)):
            out.append(i)
            best = p["test_ppl"]
    return out


def test_pareto_set():
    front = pareto_indices(CANDIDATES)
    assert [CANDIDATES[i]["label"] for i in front] == ["gptq 3-bit", "0.8 + 4-bit", "0.9 + 8-bit", "gptq 8-bit"]
    rng = random.Random(0)
    for _ in range(50):
        pts = [{"bytes": rng.choice([1, 2, 3, 4, 5]), "test_ppl": rng.choice([1.0, 2.0, 3.0])} for _ in range(8)]
        assert pareto_indices(pts) == brute_force_front(pts)


def test_writes_a_png_with_every_family_the_front_and_the_choice(tmp_path):
    pytest.importorskip("matplotlib")
    from PIL import Image

    fig = frontier_figure(CANDIDATES, base_ppl=10.0, budget_ppl=10.1)
    labels = fig.axes[0].get_legend_handles_labels()[1]
    for family in ("gptq", "factorize+gptq", "gptq+lowrank", "factorize", "Pareto set", "chosen: 0.9 + 8-bit"):
        assert family in labels
    assert fig.axes[0].get_xscale() == "log"
    out = write_frontier_png(tmp_path / "frontier.png", CANDIDATES, chosen="gptq 8-bit")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(out) as img:
        img.verify()
    with Image.open(out) as img:
        assert img.size == (960, 600) and img.getextrema() != ((255, 255), (255, 255), (255, 255), (255, 255))


def test_without_matplotlib_a_warning_and_no_file(tmp_path, monkeypatch, caplog):
    import builtins

    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name.startswith("matplotlib"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    assert write_frontier_png(tmp_path / "f.png", CANDIDATES) is None
    assert not (tmp_path / "f.png").exists() and "frontier.png not drawn" in caplog.text


def test_bad_input(tmp_path):
    pytest.importorskip("matplotlib")
    with pytest.raises(ValueError):
        frontier_figure([])
    with pytest.raises(ValueError):
        write_frontier_png(tmp_path / "x.png", CANDIDATES, chosen="no such label")
    assert not (tmp_path / "x.png").exists()
