"""Perplexity against parameters kept, for `svd` and `lord`, uniform and allocated ranks (issue: decompose a).

Each run compresses the model with `lowrank decompose --params-ratio KEEP`, reads the code perplexity the run
measured on held-out stdlib code, then evaluates the output on prose (the stdlib's documentation topics).
Calibration: 16 x 512 tokens of stdlib code (the "calib" part); evaluation: 4096 held-out code tokens and
4096 prose tokens. Configurations:

    svd-uniform         plain SVD of the weights, same kept fraction in every layer
    whiten-uniform      data-aware (whitened) SVD, uniform, no sequential update: the SVD-LLM recipe
    lord-uniform        lord with sequential calibration, uniform ranks
    lord-fisher         lord with sequential calibration and Fisher-weighted rank allocation
    lord-fisher-blockseq  lord, Fisher allocation, sequential across blocks, one Gram forward per block
    lord-fisher-noseq   lord, Fisher allocation, every Gram measured on the input model's activations
    lord-fisher-noseq-f32  the same with float32 Gram products (summed in float64) for the factors

    python benchmarks/decompose_quality.py --model demo --keep 0.9 0.8 0.7
    python benchmarks/decompose_quality.py --model smollm2 --keep 0.8 --configs whiten-uniform lord-fisher

Prints a table; writes benchmarks/results/decompose_quality-<model>.json.
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

CONFIGS = {
    "svd-uniform": dict(method="svd", allocation="uniform", sequential=False),
    "whiten-uniform": dict(method="lord", allocation="uniform", sequential=False),
    "lord-uniform": dict(method="lord", allocation="uniform", sequential=True),
    "lord-error": dict(method="lord", allocation="error", sequential=True),
    "lord-fisher": dict(method="lord", allocation="fisher", sequential=True),
    "lord-fisher-blockseq": dict(method="lord", allocation="fisher", sequential=True, true_sequential=False),
    "lord-fisher-noseq": dict(method="lord", allocation="fisher", sequential=False),
    "lord-fisher-noseq-f32": dict(method="lord", allocation="fisher", sequential=False, gram_products="float32"),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="demo", help="demo, smollm2, or a checkpoint folder")
    parser.add_argument("--keep", type=float, nargs="+", default=[0.9, 0.8, 0.7])
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--calib-samples", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--eval-tokens", type=int, default=4096)
    parser.add_argument("--out", default=None, help="JSON path (default benchmarks/results/...)")
    args = parser.parse_args()

    from lowrank_cli.api.decompose import DecomposeOptions, decompose
    from lowrank_cli.api.evaluate import evaluate

    path = model_path(args.model)
    common = dict(calib_samples=args.calib_samples, calib_seq_len=args.seq_len, eval_tokens=args.eval_tokens,
                  test_tokens=args.eval_tokens)
    t0 = time.perf_counter()
    base_prose = evaluate(path, data="stdlib-prose", seq_len=args.seq_len, max_tokens=args.eval_tokens)
    rows = []
    print(f"{'config':16} {'keep':>5} {'kept':>6} {'model':>6} {'code ppl':>10} {'code test':>10} "
          f"{'prose ppl':>10} {'time s':>7}", flush=True)
    base_code = None
    for keep in args.keep:
        for name in args.configs:
            with tempfile.TemporaryDirectory() as tmp:
                out = Path(tmp) / "out"
                start = time.perf_counter()
                res = decompose(path, DecomposeOptions(output=str(out), params_ratio=keep, **CONFIGS[name],
                                                       **common))
                seconds = time.perf_counter() - start
                prose = evaluate(str(out), data="stdlib-prose", seq_len=args.seq_len,
                                 max_tokens=args.eval_tokens)
            base_code = res.perplexity["baseline"]
            row = {"config": name, "keep": keep, "kept_targeted": res.params["targeted_ratio"],
                   "kept_model": res.params["model_ratio"], "code_ppl": res.perplexity["final"],
                   "code_test_ppl": res.perplexity.get("test_final"),
                   "prose_ppl": prose.perplexity, "seconds": round(seconds, 1),
                   "timings_s": res.timings_s, "peak_rss_bytes": res.memory.get("peak_rss_bytes")}
            rows.append(row)
            print(f"{name:16} {keep:5.2f} {row['kept_targeted']:6.3f} {row['kept_model']:6.3f} "
                  f"{row['code_ppl']:10.3f} {row['code_test_ppl'] or float('nan'):10.3f} "
                  f"{row['prose_ppl']:10.3f} {seconds:7.1f}", flush=True)
    print(f"baseline: code {base_code:.3f}, prose {base_prose.perplexity:.3f}; total {time.perf_counter() - t0:.0f} s")
    doc = {"model": args.model, "baseline": {"code_ppl": base_code, "prose_ppl": base_prose.perplexity},
           "settings": vars(args), "rows": rows}
    target = Path(args.out) if args.out else HERE / "results" / f"decompose_quality-{Path(args.model).name}.json"
    target.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"wrote {target}")


if __name__ == "__main__":
    main()
