"""Whether decompose's profile pass may run its calibration stream in bfloat16 (issue 14, the steering passes).

The profile pass carries the calibration text (whose Grams give the allocation's error curves and whose block
boundaries the Fisher pass replays) and the eval/test text (the reported baseline perplexities) through the
original model. Only the calibration stream steers; this runs the profile pass and the Fisher pass twice on
the same model and windows, once in float32 and once with the shared calibration forward under bfloat16
autocast (`run_pipeline(calib_autocast=...)`; the Fisher pass in bfloat16 both times, as the default on
hardware with fast bfloat16), and compares the ranks allocated at a kept fraction and the seconds.

    python benchmarks/profile_autocast.py --model smollm2            # keep 0.8, decompose's defaults
    python benchmarks/profile_autocast.py --model demo --keeps 0.6 0.8

Prints the comparison; writes benchmarks/results/profile_autocast-<model>.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from smollm2 import model_path  # noqa: E402  (beside this script)

COMMON = dict(calib_samples=16, eval_tokens=4096, test_tokens=4096)  # as benchmarks/pipeline_speed.py


def profile(job, calib_autocast) -> dict:
    """One profile pass (calibration stream under `calib_autocast`) and one Fisher pass: curves, seconds."""
    from lowrank_cli.engine.sequential import Candidate, run_pipeline
    from lowrank_cli.methods.decompose.allocate import LayerCurve
    from lowrank_cli.methods.decompose.modifier import Profiler

    profiler = Profiler("lord", job.opts.damp)
    start = time.perf_counter()
    outcome = run_pipeline(job.streamed, job.windows.calib, job._evalsets(), job.targets,
                           [Candidate("profile", profiler)], sequential=False, batch_size=job.opts.batch_size,
                           keep_boundaries=True, calib_autocast=calib_autocast)
    seconds = time.perf_counter() - start
    start = time.perf_counter()
    sens = job.sensitivities(job.windows.calib, outcome.boundaries)
    fisher = time.perf_counter() - start
    curves = [LayerCurve(t.name, t.m, t.n, profiler.tails[t.name], sens[t.name]) for t in job.targets]
    nll = outcome.only()[0]
    return {"curves": curves, "profile_s": round(seconds, 1), "fisher_s": round(fisher, 1),
            "eval_ppl": nll["eval"].perplexity, "test_ppl": nll["test"].perplexity, "sens": sens}


def main() -> None:
    import torch

    from lowrank_cli.api.common import load_tokenizer, solver_windows
    from lowrank_cli.api.decompose import DecomposeOptions, _Job
    from lowrank_cli.api.solver import open_input
    from lowrank_cli.methods.decompose.allocate import allocate_ranks
    from lowrank_cli.utils.progress import Progress

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="demo")
    parser.add_argument("--keeps", type=float, nargs="+", default=[0.8])
    args = parser.parse_args()
    model = model_path(args.model)
    opts = DecomposeOptions(output=str(Path(tempfile.mkdtemp()) / "unused"), params_ratio=args.keeps[0], **COMMON)
    opts, path, ckpt = open_input(model, opts, {}, refuse_quantized="")
    job = _Job(model, path, ckpt, opts, Progress())
    job.windows = solver_windows(load_tokenizer(path), opts)
    torch.manual_seed(opts.seed)
    runs = {name: profile(job, dtype) for name, dtype in (("float32", None), ("bfloat16", torch.bfloat16))}
    base, low = runs["float32"], runs["bfloat16"]
    rows = []
    for keep in args.keeps:
        a = allocate_ranks(base["curves"], keep, opts.rank_multiple)
        b = allocate_ranks(low["curves"], keep, opts.rank_multiple)
        size = {c.name: c.m + c.n for c in base["curves"]}
        moved = sum(abs((a.get(n) or 0) - (b.get(n) or 0)) * size[n] for n in size) / 2
        rows.append({"keep": keep, "layers_changed": sum(a.get(n) != b.get(n) for n in size), "layers": len(size),
                     "params_moved_fraction": moved / job.targeted_before})
    sens_rel = sorted(abs(low["sens"][n] / base["sens"][n] - 1) for n in base["sens"])
    doc = {"model": args.model, "common": COMMON, "command": "python benchmarks/profile_autocast.py "
           + " ".join(sys.argv[1:]), "sensitivity_precision": job.precision.get("sensitivity"),
           "seconds": {k: {"profile": r["profile_s"], "fisher": r["fisher_s"]} for k, r in runs.items()},
           "baseline_ppl": {k: [r["eval_ppl"], r["test_ppl"]] for k, r in runs.items()},
           "sensitivity_rel_diff": {"median": sens_rel[len(sens_rel) // 2], "max": sens_rel[-1]}, "ranks": rows}
    out = HERE / "results" / f"profile_autocast-{args.model}.json"
    out.write_text(json.dumps(doc, indent=2) + "\n")
    print(json.dumps(doc, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
