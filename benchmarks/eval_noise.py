"""How noisy is a perplexity measured on N tokens? Base model alone, and the paired ratio GPTQ / base.

One pool of held-out windows (the stdlib's "eval" part, 512-token windows) is scored by the base model and by
its GPTQ 4-bit copy (`lowrank quantize MODEL --calib-samples 16`), keeping each window's NLL sum. For
N = 4096, 8192, 16384 tokens the pool is cut into disjoint sets of N tokens, and the table shows

- the spread across those sets: the relative standard deviation of the base perplexity, and the standard
  deviation of the paired ratio ppl(GPTQ) / ppl(base) (both on the same set), and
- the formula's standard error (`lowrank_cli.eval.noise.ppl_noise`, from the windows of one set), averaged
  over the sets, so the two can be compared.

A budget B resolves on N tokens when B > 2 x (paired-ratio standard error); the last lines give the tokens
that takes for a 1% budget (the error falls as 1 / sqrt(N)).

    flock /tmp/lowrank-bench.lock python benchmarks/eval_noise.py --model smollm2
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
SIZES = (4096, 8192, 16384)
SEQ_LEN = 512


def scores(model_dir: str, windows, *, dequantize: bool) -> list[float]:
    import torch

    from lowrank_cli.eval.perplexity import nll_full
    from lowrank_cli.modeling.export import load_model

    extra = {"dequantize": True} if dequantize else {}  # float32 weights: the model GPTQ's error is about
    model = load_model(model_dir, dtype=torch.float32, **extra)
    model.eval()
    return nll_full(model, windows, per_window=True).per_window


def quantized_copy(model: str, folder: str, bits: int, calib_samples: int, method: str) -> None:
    args = ["lowrank", "quantize", model, "-o", folder, "--bits", str(bits), "--method", method,
            "--calib-samples", str(calib_samples), "--skip-eval", "--json"]
    print("$", " ".join(args), flush=True)
    done = subprocess.run(args, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"quantize failed: {done.stdout[-2000:]}\n{done.stderr[-2000:]}")


def table(base: list[float], quant: list[float], tokens: int) -> list[dict]:
    from lowrank_cli.eval.noise import ppl_noise

    rows = []
    for size in SIZES:
        per_set = size // SEQ_LEN
        sets = len(base) // per_set
        if sets < 2:
            continue
        found = [ppl_noise(quant[i * per_set:(i + 1) * per_set], tokens, base[i * per_set:(i + 1) * per_set])
                 for i in range(sets)]
        alone = [ppl_noise(base[i * per_set:(i + 1) * per_set], tokens) for i in range(sets)]
        ppls = [n.perplexity for n in alone]
        ratios = [n.ratio for n in found]
        rows.append({
            "tokens": size, "sets": sets,
            "base_ppl_mean": statistics.fmean(ppls),
            "base_spread_rel": statistics.stdev(ppls) / statistics.fmean(ppls),
            "base_se_formula": statistics.fmean(n.relative_se for n in alone),
            "ratio_mean": statistics.fmean(ratios),
            "ratio_spread": statistics.stdev(ratios),
            "ratio_se_formula": statistics.fmean(n.ratio_relative_se for n in found),
            # the paired noise grows with the damage: spread per unit of perplexity increase
            "ratio_spread_per_increase": statistics.stdev(ratios) / (statistics.fmean(ratios) - 1),
        })
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2", help="smollm2, demo or a folder")
    ap.add_argument("--pool-tokens", type=int, default=32768, help="held-out tokens scored by each model")
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--method", default="gptq", help="gptq or rtn (no calibration)")
    ap.add_argument("--calib-samples", type=int, default=16)
    args = ap.parse_args()
    model = args.model
    if model == "smollm2":
        from smollm2 import smollm2_path

        model = str(smollm2_path())
    from lowrank_cli.api.common import load_tokenizer, text_windows
    from lowrank_cli.eval.noise import ppl_noise
    from lowrank_cli.io.resolve import resolve_model

    path = resolve_model(model)
    windows = text_windows(load_tokenizer(path), "stdlib", part="eval", seq_len=SEQ_LEN,
                           max_tokens=args.pool_tokens, seed=0)
    tokens = SEQ_LEN - 1
    start = time.perf_counter()
    base = scores(str(path), windows, dequantize=False)
    base_s = time.perf_counter() - start
    with tempfile.TemporaryDirectory() as tmp:
        quantized_copy(str(path), f"{tmp}/q", args.bits, args.calib_samples, args.method)
        quant = scores(f"{tmp}/q", windows, dequantize=True)
    rows = table(base, quant, tokens)
    pool = ppl_noise(quant, tokens, base)
    base_ppl = math.exp(sum(base) / (tokens * len(base)))
    print(f"\npool: {windows.shape[0]} windows x {SEQ_LEN} tokens; base ppl {base_ppl:.3f}"
          f", {args.method} {args.bits}-bit ratio {pool.ratio:.4f}; base scoring {base_s:.0f} s")
    print(f"{'tokens':>7}{'sets':>5}{'base ppl':>10}{'base spread':>13}{'base SE':>9}"
          f"{'ratio':>8}{'ratio spread':>14}{'ratio SE':>10}{'spread/increase':>17}")
    for r in rows:
        print(f"{r['tokens']:>7}{r['sets']:>5}{r['base_ppl_mean']:>10.3f}{100 * r['base_spread_rel']:>12.2f}%"
              f"{100 * r['base_se_formula']:>8.2f}%{r['ratio_mean']:>8.4f}{100 * r['ratio_spread']:>13.2f}%"
              f"{100 * r['ratio_se_formula']:>9.2f}%{r['ratio_spread_per_increase']:>17.2f}")
    # tokens for 2 SE <= 1%, from the whole pool's paired standard error scaled by 1/sqrt(N)
    pool_tokens = windows.shape[0] * SEQ_LEN
    need = pool_tokens * (2 * pool.ratio_relative_se / 0.01) ** 2
    spread = max(r["ratio_spread"] for r in rows if r["tokens"] == SIZES[0]) if rows else float("nan")
    need_spread = SIZES[0] * (2 * spread / 0.01) ** 2
    print(f"paired SE over the whole pool: {100 * pool.ratio_relative_se:.3f}% -> 2 SE <= 1% needs about "
          f"{need:.0f} tokens (formula), {need_spread:.0f} tokens (spread at {SIZES[0]})")
    name = Path(args.model).name if args.model not in ("smollm2", "demo") else args.model
    suffix = "" if (args.method, args.bits) == ("gptq", 4) else f"-{args.method}{args.bits}"
    out = HERE / "results" / f"eval_noise-{name}{suffix}.json"
    out.write_text(json.dumps({
        "settings": {**vars(args), "seq_len": SEQ_LEN, "data": "stdlib eval part", "windows": int(windows.shape[0])},
        "pool": {"ratio": pool.ratio, "ratio_relative_se": pool.ratio_relative_se,
                 "base_relative_se": ppl_noise(base, tokens).relative_se,
                 "tokens_for_1pct_at_2se_formula": round(need), "tokens_for_1pct_at_2se_spread": round(need_spread)},
        "rows": rows, "per_window": {"base": base, "quantized": quant}}, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
