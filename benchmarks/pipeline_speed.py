"""Wall time of the weight-changing jobs on the shared pipeline, as ratios within one run (issue: pipeline).

Each configuration runs in a fresh process (library API, the command's defaults unless stated), one after
the other, on the same model, calibration (16 x 512) and eval/test text (4096 + 4096 tokens):

    reference     decompose --params-ratio 0.8 --allocation uniform --no-sequential: calibrate once,
                  whitened SVD per layer, uniform ranks (the plain recipe the default is compared with)
    default       decompose --params-ratio 0.8 (Fisher allocation; sequential calibration only below kept 0.75,
                  so none here: the profile's Grams serve the compress pass)
    sequential    decompose --params-ratio 0.8 --sequential (the default before kept-fraction-dependent calibration)
    fisher-no-seq decompose --params-ratio 0.8 --no-sequential (Fisher allocation, the input model's Grams, kept
                  from the profile pass for the compress pass)
    default-block-seq  decompose --params-ratio 0.8 --sequential --no-true-sequential (sequential across blocks,
                  one Gram forward per block)
    default-10k   default at the command's own eval/test sizes (10240 + 10240 tokens)
    search-1pct   decompose --target-ppl-increase 1% (the default --search-width)
    search-1pct-w3  the same with --search-width 3 (3 kept fractions per streamed pass)
    search-1pct-w1  the same with --search-width 1 (bisection, one kept fraction per pass)
    quantize      quantize (GPTQ 4-bit, asymmetric, act-order, g128; baseline and quantized in one pass)
    compress      compress --target-ppl-increase 5% --eval-tokens 5120 (8 candidates; one calibration pass with
                  Fisher sensitivities, one candidates pass, candidates predicted far over budget pruned mid-pass)
    compress-no-prune  the same with --no-prune: every candidate built and measured
With --busy, every configuration runs again beside a second process that keeps both cores busy with
matrix products (a CI neighbour), to show how much a loaded machine slows each.

    python benchmarks/pipeline_speed.py --model smollm2
    python benchmarks/pipeline_speed.py --model demo --configs reference default --busy

Prints a table; writes benchmarks/results/pipeline_speed-<model>.json.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from smollm2 import model_path  # noqa: E402  (beside this script)

COMMON = dict(calib_samples=16, eval_tokens=4096, test_tokens=4096)
CONFIGS = {
    "reference": ("decompose", dict(params_ratio=0.8, allocation="uniform", sequential=False)),
    "default": ("decompose", dict(params_ratio=0.8)),
    "fisher-no-seq": ("decompose", dict(params_ratio=0.8, sequential=False)),
    "sequential": ("decompose", dict(params_ratio=0.8, sequential=True)),
    "default-block-seq": ("decompose", dict(params_ratio=0.8, sequential=True, true_sequential=False)),
    "default-10k": ("decompose", dict(params_ratio=0.8, eval_tokens=10240, test_tokens=10240)),
    "search-1pct": ("decompose", dict(target_ppl_increase=0.01)),
    "search-1pct-w3": ("decompose", dict(target_ppl_increase=0.01, search_width=3)),
    "search-1pct-w1": ("decompose", dict(target_ppl_increase=0.01, search_width=1)),
    "quantize": ("quantize", dict(calib_samples=16)),
    # 5% needs 4,596 eval tokens to stand above the noise (compress refuses fewer)
    "compress": ("compress", dict(target_ppl_increase=0.05, eval_tokens=5120)),
    "compress-no-prune": ("compress", dict(target_ppl_increase=0.05, eval_tokens=5120, prune=False)),
}


def _job(kind: str, model: str, overrides: dict, queue) -> None:
    from lowrank_cli.api.jobs import JOBS
    from lowrank_cli.errors import LowrankError
    from lowrank_cli.utils.memory import peak_rss_bytes

    job = JOBS[kind]
    out = Path(tempfile.mkdtemp(prefix="speed-")) / "out"
    opts = job.options(output=str(out), **{**COMMON, **overrides})
    start = time.perf_counter()
    try:
        result = job.run(model, opts)
        doc = {"ok": True, "timings_s": result.timings_s, "precision": getattr(result, "precision", None)}
        if kind == "decompose":
            doc.update(kept=result.params["targeted_ratio"], ppl=result.perplexity["final"],
                       test_ppl=result.perplexity["test_final"], evaluations=len(result.evaluations),
                       passes=len({e["pass"] for e in result.evaluations}))
        elif kind == "compress":
            doc.update(chosen=result.chosen["label"], test_ppl=result.chosen["test_perplexity"],
                       candidates=[{k: c.get(k) for k in ("label", "bytes", "eval_increase", "test_increase",
                                                           "predicted_increase", "pruned", "seconds")}
                                   for c in result.candidates])
        else:
            doc.update(ppl=result.perplexity["final"], test_ppl=result.perplexity["test_final"])
    except LowrankError as exc:
        doc = {"ok": False, "error": exc.message, "details": getattr(exc, "details", None)}
    doc.update(seconds=round(time.perf_counter() - start, 1), peak_rss_mib=round(peak_rss_bytes() / 2**20))
    queue.put(doc)


def _spin(stop) -> None:
    import numpy as np

    a = np.random.rand(800, 800)
    while not stop.is_set():
        a = (a @ a) / 800.0


def measure(kind: str, model: str, overrides: dict, busy: bool) -> dict:
    ctx = mp.get_context("spawn")
    queue, stop = ctx.Queue(), ctx.Event()
    neighbour = ctx.Process(target=_spin, args=(stop,)) if busy else None
    if neighbour:
        neighbour.start()
    proc = ctx.Process(target=_job, args=(kind, model, overrides, queue))
    proc.start()
    doc = queue.get()
    proc.join()
    if neighbour:
        stop.set()
        neighbour.join()
    return doc


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="demo")
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS))
    parser.add_argument("--busy", action="store_true")
    parser.add_argument("--tag", default="", help="suffix of the JSON file name")
    args = parser.parse_args()
    model = model_path(args.model)
    rows = []
    for busy in ([False, True] if args.busy else [False]):
        for name in args.configs:
            kind, overrides = CONFIGS[name]
            doc = measure(kind, model, overrides, busy)
            rows.append({"config": name, "job": kind, "options": overrides, "busy": busy, **doc})
            print(f"{name:12s} busy={busy!s:5s} {doc['seconds']:8.1f} s  {json.dumps(doc.get('timings_s'))}",
                  flush=True)
    ref = {r["busy"]: r["seconds"] for r in rows if r["config"] == "reference"}
    for r in rows:
        r["x_reference"] = round(r["seconds"] / ref[r["busy"]], 2) if r["busy"] in ref else None
    out = HERE / "results" / f"pipeline_speed-{args.model}{args.tag}.json"
    command = "python benchmarks/pipeline_speed.py " + " ".join(sys.argv[1:])
    doc = {"model": args.model, "common": COMMON, "rows": rows, "command": command}
    out.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"\n{'config':12s} {'busy':5s} {'s':>8s} {'x ref':>6s}  result")
    for r in rows:
        what = r.get("chosen") or (f"kept {r['kept']:.3f}" if "kept" in r else "")
        print(f"{r['config']:12s} {r['busy']!s:5s} {r['seconds']:8.1f} {r['x_reference'] or '':>6}  {what} "
              f"test ppl {r.get('test_ppl', float('nan')):.3f}")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
