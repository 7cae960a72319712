"""GPTQ against round-to-nearest (and gptqmodel) on the same grid and calibration text (issue: quantize).

Each configuration quantizes the model with `lowrank quantize` (or gptqmodel), then evaluates the output,
dequantized in float32, on 4096 held-out stdlib code tokens and 4096 stdlib prose tokens. Calibration:
16 x 512 tokens of stdlib code (the "calib" part), the same windows for every method. Wall time is the
quantize call alone (no evaluation inside it: --skip-eval semantics, the quantized-perplexity pass excluded
is not separable, so it is included and reported as is).

    rtn4-asym-g128    round to nearest, 4-bit, asymmetric, groups of 128 (the reference's RTN)
    gptq4-sym-g128    GPTQ 4-bit symmetric g128 (gptqmodel's default grid)
    gptq4-asym-g128   GPTQ 4-bit asymmetric g128
    gptq4-asym-g128-ao   ... with act-order (the command's default grid)
    rtn3-asym-g128 / gptq3-asym-g128       3-bit
    rtn4-asym-pc / gptq4-asym-pc           4-bit per channel (group -1)
    gptqmodel4-sym-g128   gptqmodel 7.6.0 on the same windows (pip install 'lowrank-cli[gptq]')
    gptqmodel4-asym-g128-ao   gptqmodel on our default grid (asymmetric, act-order)
    lord80+gptq4-asym-g128-ao   decompose --params-ratio 0.8 (rank multiple 32), then GPTQ 4-bit (defaults)

    python benchmarks/quantize_quality.py --model demo
    python benchmarks/quantize_quality.py --model smollm2 --configs rtn4-asym-g128 gptq4-asym-g128-ao

Prints a table; writes benchmarks/results/quantize_quality-<model>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from smollm2 import model_path  # noqa: E402  (beside this script)


def _grid(bits, sym, group, act_order=False):
    return dict(bits=bits, sym=sym, group_size=group, act_order=act_order)


CONFIGS = {
    "rtn4-asym-g128": dict(method="rtn", **_grid(4, False, 128)),
    "gptq4-sym-g128": dict(method="gptq", **_grid(4, True, 128)),
    "gptq4-asym-g128": dict(method="gptq", **_grid(4, False, 128)),
    "gptq4-asym-g128-ao": dict(method="gptq", **_grid(4, False, 128, act_order=True)),
    "rtn3-asym-g128": dict(method="rtn", **_grid(3, False, 128)),
    "gptq3-asym-g128": dict(method="gptq", **_grid(3, False, 128)),
    "rtn4-asym-pc": dict(method="rtn", **_grid(4, False, -1)),
    "gptq4-asym-pc": dict(method="gptq", **_grid(4, False, -1)),
    "gptqmodel4-sym-g128": dict(method="gptqmodel", **_grid(4, True, 128)),
    "gptqmodel4-asym-g128-ao": dict(method="gptqmodel", **_grid(4, False, 128, act_order=True)),
    "lord80+gptq4-asym-g128-ao": dict(method="gptq", decompose=0.8, **_grid(4, False, 128, act_order=True)),
}
DEFAULT = [c for c in CONFIGS if not c.startswith("gptqmodel")]


def run_gptqmodel(src: str, out: Path, cfg: dict, calib) -> None:
    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")
    from gptqmodel import GPTQModel, QuantizeConfig

    from lowrank_cli.io.resolve import resolve_model
    from lowrank_cli.utils.third_party import gptqmodel_logs_elsewhere

    qcfg = QuantizeConfig(bits=cfg["bits"], group_size=cfg["group_size"], sym=cfg["sym"],
                          desc_act=cfg.get("act_order", False))
    model = GPTQModel.load(str(resolve_model(src)), qcfg)
    rows = [{"input_ids": w.tolist(), "attention_mask": [1] * len(w)} for w in calib]
    with gptqmodel_logs_elsewhere():  # not ./logs
        model.quantize(rows, batch_size=1)
    model.save(str(out))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="demo", help="demo, smollm2, or a checkpoint folder")
    parser.add_argument("--configs", nargs="+", default=DEFAULT, choices=list(CONFIGS))
    parser.add_argument("--calib-samples", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--eval-tokens", type=int, default=4096)
    parser.add_argument("--out", default=None, help="JSON path (default benchmarks/results/...)")
    args = parser.parse_args()

    import torch

    from lowrank_cli.api.common import load_tokenizer, text_windows
    from lowrank_cli.api.decompose import DecomposeOptions, decompose
    from lowrank_cli.api.evaluate import evaluate
    from lowrank_cli.api.quantize import QuantizeOptions, quantize
    from lowrank_cli.io.resolve import resolve_model

    src = model_path(args.model)
    # streaming evaluation dequantizes GPTQ folders in float32: every row is measured the same way
    common = dict(seq_len=args.seq_len, max_tokens=args.eval_tokens, streaming=True)

    def perplexities(folder):
        return {"code": evaluate(str(folder), **common).perplexity,
                "prose": evaluate(str(folder), data="stdlib-prose", **common).perplexity}

    rows = []
    start = time.perf_counter()
    base = perplexities(src)
    rows.append({"config": "base (float32)", **base, "seconds": None})
    print(f"base: code {base['code']:.3f} prose {base['prose']:.3f}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        lord = None
        for name in args.configs:
            cfg = dict(CONFIGS[name])
            out = Path(tmp) / name
            t0 = time.perf_counter()
            if cfg.pop("method") == "gptqmodel":
                calib = text_windows(load_tokenizer(resolve_model(src)), None, part="calib", seq_len=args.seq_len,
                                     max_tokens=args.calib_samples * args.seq_len, seed=0)
                run_gptqmodel(src, out, cfg, calib)
                method = "gptqmodel"
            else:
                method = CONFIGS[name]["method"]
                model = src
                keep = cfg.pop("decompose", None)
                if keep is not None:
                    if lord is None:
                        lord = Path(tmp) / "lord"
                        decompose(src, DecomposeOptions(output=str(lord), params_ratio=keep, rank_multiple=32,
                                                        calib_samples=args.calib_samples,
                                                        calib_seq_len=args.seq_len, eval_tokens=args.eval_tokens))
                        lord_ppl = perplexities(lord)
                        rows.append({"config": f"lord{int(keep * 100)} (float32)", **lord_ppl, "seconds": None})
                        print(f"lord{int(keep * 100)}: code {lord_ppl['code']:.3f} prose {lord_ppl['prose']:.3f}",
                              flush=True)
                    model = str(lord)
                    t0 = time.perf_counter()
                quantize(model, QuantizeOptions(output=str(out), calib_samples=args.calib_samples,
                                                calib_seq_len=args.seq_len, eval_tokens=args.eval_tokens,
                                                skip_eval=True, method=method, **cfg))
            seconds = time.perf_counter() - t0
            ppl = perplexities(out)
            rows.append({"config": name, **ppl, "seconds": round(seconds, 1)})
            print(f"{name}: code {ppl['code']:.3f} prose {ppl['prose']:.3f} ({seconds:.0f} s)", flush=True)

    print(f"\n{'config':26} {'code ppl':>9} {'prose ppl':>10} {'quantize s':>11}")
    for r in rows:
        secs = "" if r["seconds"] is None else f"{r['seconds']:.0f}"
        print(f"{r['config']:26} {r['code']:9.3f} {r['prose']:10.3f} {secs:>11}")
    doc = {"model": args.model, "calib": f"{args.calib_samples} x {args.seq_len} stdlib code (calib part)",
           "eval": f"{args.eval_tokens} held-out code + {args.eval_tokens} prose tokens", "torch_threads":
           torch.get_num_threads(), "rows": rows, "total_seconds": round(time.perf_counter() - start, 1)}
    path = Path(args.out) if args.out else HERE / "results" / f"quantize_quality-{Path(args.model).name}.json"
    path.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
