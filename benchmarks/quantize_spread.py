"""How far GPTQ solutions that differ only by rounding spread in perplexity (issue: pipeline, "quality kept").

GPTQ rounds each weight after feeding the earlier columns' rounding errors forward; a perturbation of the
Hessian at the level of float32 rounding (1e-7, relative) flips a few near-tie roundings, and those flips
propagate through every later column and block. Each run quantizes SmolLM2 with `lowrank quantize`'s solver
at quantize_speed.py's grid (4-bit symmetric, groups of 64, no act-order, 16 x 512 calibration) and measures
eval perplexity on the same 4096 held-out code tokens and the mean relative output error of the layers (what
GPTQ minimises). A run is SOLVER:SEED[:one-forward]: the column loop in float32 (the default) or float64, seed 0
for the unperturbed Hessian, else H * (1 + 1e-7 * sym(noise)) with that noise seed, and `--no-true-sequential`
when the third part is there.

    python benchmarks/quantize_spread.py --model smollm2 --runs float32:0 float32:1 float64:0 float64:1 float64:2

Prints one line per run; writes benchmarks/results/quantize_spread-<model><tag>.json.
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
import quantize_speed as speed  # noqa: E402  (beside this script: same grid, windows and perplexity loop)
from smollm2 import model_path  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="demo")
    parser.add_argument("--runs", nargs="+", default=["float32:0", "float32:1", "float64:0", "float64:1"])
    parser.add_argument("--eval-tokens", type=int, default=4096)
    parser.add_argument("--tag", default="", help="suffix of the result file name")
    args = parser.parse_args()

    import torch

    from lowrank_cli.api.quantize import QuantizeOptions, quantize
    from lowrank_cli.io.resolve import resolve_model
    from lowrank_cli.methods.quantize import gptq

    src = str(resolve_model(model_path(args.model)))
    windows = speed.windows(src, 16, args.eval_tokens)
    solve = gptq._gptq
    rows = []
    for run in args.runs:
        dtype, seed, *mode = run.split(":")
        generator = torch.Generator().manual_seed(int(seed))

        def perturbed(weight, hessian, grid, _seed=int(seed), _gen=generator, **kw):
            if _seed:
                noise = torch.randn(hessian.shape, generator=_gen, dtype=torch.float64)
                hessian = hessian * (1 + 1e-7 * (noise + noise.T) / 2)
            return solve(weight, hessian, grid, **kw)

        gptq._gptq = perturbed
        gptq.gptq_quantize.__kwdefaults__["dtype"] = getattr(torch, dtype)
        with tempfile.TemporaryDirectory() as tmp:
            start = time.perf_counter()
            result = quantize(src, QuantizeOptions(output=f"{tmp}/out", calib_samples=16, calib_seq_len=512,
                                                   eval_tokens=0, true_sequential=not mode, **speed.GRID))
            seconds = time.perf_counter() - start
            ppl = speed.perplexity(speed.load_for_eval("lowrank", f"{tmp}/out"), windows["eval"])
        rows.append({"solver": dtype, "seed": int(seed), "true_sequential": not mode, "seconds": round(seconds, 1),
                     "eval_perplexity": ppl,
                     "mean_output_error": result.error["gptq"]})
        print(rows[-1], flush=True)
    ppls = [r["eval_perplexity"] for r in rows]
    print(f"eval perplexity {min(ppls):.3f} .. {max(ppls):.3f} over {len(rows)} runs")
    doc = {"model": args.model, "grid": speed.GRID, "rows": rows,
           "command": "python benchmarks/quantize_spread.py " + " ".join(sys.argv[1:])}
    out = HERE / "results" / f"quantize_spread-{Path(args.model).name}{args.tag}.json"
    out.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
