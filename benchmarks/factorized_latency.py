"""CPU inference latency of a factorized SmolLM2-135M against its dense original (issue: decompose c).

`decompose --params-ratio 0.7 --method svd --allocation uniform` keeps 70% of the decoder linears'
parameters (every linear at the same kept fraction; the embeddings, which are tied to the LM head, stay
dense, so the whole model keeps ~76%). Quality does not matter for latency, so plain SVD and a minimal
calibration set are used. Dense and factorized models are loaded with `lowrank_cli.modeling.export.load_model`
in float32 and timed, with torch on 2 threads, on:

    prefill   one forward of batch 1 x 512 tokens (KV cache off, logits of the last position only, as
              `generate` computes them: the LM head is dense in both models and would dilute the ratio)
    decode    `generate(use_cache=True, do_sample=False)` of 64 new tokens (forced: min_new_tokens) from a
              32-token prompt; the prompt's own prefill is included, and is small

Each repeat runs every model once, rotating which goes first, so background load on the shared machine hits
all of them alike; medians over repeats are reported, and speedup = dense median / factorized median.

    python benchmarks/factorized_latency.py                       # keep 0.7 and 0.5 (~10 min)
    python benchmarks/factorized_latency.py --keep 0.7 --repeats 11
    python benchmarks/factorized_latency.py --work /tmp/lat       # keep the factorized models for reruns
    python benchmarks/factorized_latency.py --threads 1 2         # 1 and 2 torch threads, same run

On a machine shared with other jobs, 2 torch threads on 2 cores are oversubscribed: every parallel region
waits for a thread the OS has descheduled, and a factorized linear runs two matmuls (two waits) where the
dense one runs one, so the 2-thread figures then understate what factorization buys. Compare with
`--threads 1 2` (both timed interleaved in one run; written to factorized_latency-threads1-2.json) before
drawing conclusions.

Prints a table; writes benchmarks/results/factorized_latency.json (-threadsN for other thread counts).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def factorized_copy(src: Path, keep: float, work: Path, calib_tokens: int) -> tuple[Path, dict | None]:
    """decompose SRC to WORK/svd-uniform-KEEP (reused when already there); its params report if new."""
    from lowrank_cli.api.decompose import DecomposeOptions, decompose

    out = work / f"svd-uniform-{keep:.2f}"
    if (out / "config.json").is_file():
        return out, None
    # one short window for calibration and evaluation: svd ignores the data, the run still measures
    # a perplexity, and nothing here reads it
    res = decompose(str(src), DecomposeOptions(output=str(out), params_ratio=keep, method="svd",
                                               allocation="uniform", calib_samples=1,
                                               calib_seq_len=calib_tokens, eval_tokens=calib_tokens))
    return out, res.params


def prompt_ids(tokenizer, n: int):
    """n tokens of real text (a stdlib source file), batch 1: realistic ids; the content is irrelevant."""
    import json as json_mod

    import torch

    text = Path(json_mod.__file__).with_name("decoder.py").read_text()
    ids = tokenizer(text, return_tensors="pt").input_ids
    while ids.shape[1] < n:
        ids = torch.cat([ids, ids], dim=1)
    return ids[:, :n]


def time_prefill(model, ids) -> float:
    import torch

    with torch.inference_mode():
        start = time.perf_counter()
        model(input_ids=ids, use_cache=False, logits_to_keep=1)
        return time.perf_counter() - start


def time_decode(model, prompt, new_tokens: int, pad_id: int) -> float:
    import torch

    with torch.inference_mode():
        start = time.perf_counter()
        out = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new_tokens,
                             min_new_tokens=new_tokens, do_sample=False, use_cache=True, pad_token_id=pad_id)
        seconds = time.perf_counter() - start
    if out.shape[1] != prompt.shape[1] + new_tokens:  # a shorter run would flatter its latency
        raise RuntimeError(f"generated {out.shape[1] - prompt.shape[1]} tokens, expected {new_tokens}")
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--keep", type=float, nargs="+", default=[0.7, 0.5],
                        help="params ratios (kept fraction of the decoder linears)")
    parser.add_argument("--model", default="smollm2", help="smollm2 or a checkpoint folder")
    parser.add_argument("--prefill-tokens", type=int, default=512)
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, nargs="+", default=[2],
                        help="torch thread counts; several are timed interleaved in the same run")
    parser.add_argument("--calib-tokens", type=int, default=256, help="decompose's (unused) calibration window")
    parser.add_argument("--work", default=None, help="folder for the factorized models (default: temporary)")
    parser.add_argument("--out", default=None, help="JSON path (default benchmarks/results/...)")
    args = parser.parse_args()

    import torch
    import transformers
    from transformers import AutoTokenizer

    from lowrank_cli.modeling.export import load_model
    from lowrank_cli.modeling.lowrank_modeling import LowRankLinear

    transformers.logging.set_verbosity_error()  # generation-config chatter on every generate() call
    if args.model == "smollm2":
        sys.path.insert(0, str(HERE))
        from smollm2 import smollm2_path

        src = smollm2_path()
    else:
        src = Path(args.model)
    tmp = None if args.work else tempfile.TemporaryDirectory(prefix="lowrank-lat-")
    work = Path(args.work or tmp.name)
    work.mkdir(parents=True, exist_ok=True)

    t0 = time.perf_counter()
    variants = [("dense", src, None)]
    for keep in args.keep:
        start = time.perf_counter()
        path, params = factorized_copy(src, keep, work, args.calib_tokens)
        print(f"factorized keep={keep:.2f}: {path} ({time.perf_counter() - start:.0f} s)", flush=True)
        variants.append((f"svd {keep:.2f}", path, params))

    tokenizer = AutoTokenizer.from_pretrained(str(src))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    long_ids = prompt_ids(tokenizer, args.prefill_tokens)
    prompt = long_ids[:, : args.prompt_tokens]

    models = []
    for name, path, decompose_params in variants:
        model = load_model(path, dtype=torch.float32)
        n_lowrank = sum(isinstance(m, LowRankLinear) for m in model.modules())
        params = sum(p.numel() for p in model.parameters())  # tied embeddings counted once
        models.append({"name": name, "path": str(path), "model": model, "params": params,
                       "lowrank_layers": n_lowrank, "decompose_params": decompose_params,
                       "prefill_s": {t: [] for t in args.threads}, "decode_s": {t: [] for t in args.threads}})
        # warm-up: first calls pay for allocator growth and oneDNN kernel selection
        for threads in args.threads:
            torch.set_num_threads(threads)
            time_prefill(model, long_ids)
            time_decode(model, prompt, 4, pad_id)

    for r in range(args.repeats):
        order = models[r % len(models):] + models[: r % len(models)]  # rotate who runs first
        for threads in args.threads:
            torch.set_num_threads(threads)
            for m in order:
                m["prefill_s"][threads].append(time_prefill(m["model"], long_ids))
            for m in order:
                m["decode_s"][threads].append(time_decode(m["model"], prompt, args.new_tokens, pad_id))
            print(f"repeat {r + 1}/{args.repeats}, {threads} thread(s): " + ", ".join(
                f"{m['name']} {m['prefill_s'][threads][-1]:.2f}/{m['decode_s'][threads][-1]:.2f} s"
                for m in models), flush=True)

    rows = []
    for threads in args.threads:
        dense = models[0]
        d_pre = statistics.median(dense["prefill_s"][threads])
        d_dec = statistics.median(dense["decode_s"][threads])
        print(f"\ntorch threads {threads}; prefill 1 x {args.prefill_tokens} tokens; decode {args.new_tokens} "
              f"tokens from a {args.prompt_tokens}-token prompt; medians of {args.repeats}")
        print(f"{'model':10} {'params':>12} {'ratio':>6} {'lowrank':>7} {'prefill ms':>10} {'speedup':>7} "
              f"{'decode ms':>9} {'ms/token':>8} {'speedup':>7}")
        for m in models:
            pre, dec = statistics.median(m["prefill_s"][threads]), statistics.median(m["decode_s"][threads])
            row = {"name": m["name"], "threads": threads, "path": m["path"], "params": m["params"],
                   "params_ratio_model": m["params"] / dense["params"], "lowrank_layers": m["lowrank_layers"],
                   "decompose_params": m["decompose_params"], "prefill_s_median": pre, "decode_s_median": dec,
                   "decode_ms_per_token": dec / args.new_tokens * 1000, "prefill_speedup": d_pre / pre,
                   "decode_speedup": d_dec / dec, "prefill_s": m["prefill_s"][threads],
                   "decode_s": m["decode_s"][threads]}
            rows.append(row)
            print(f"{m['name']:10} {m['params']:12,} {row['params_ratio_model']:6.3f} {m['lowrank_layers']:7d} "
                  f"{pre * 1000:10.1f} {row['prefill_speedup']:7.2f} {dec * 1000:9.1f} "
                  f"{row['decode_ms_per_token']:8.1f} {row['decode_speedup']:7.2f}")
    if len(args.threads) > 1:
        # same run, same models: what the extra threads buy (below 1: oversubscribed cores)
        lo, hi = min(args.threads), max(args.threads)
        print(f"\n{hi} threads vs {lo}, speedup (median {lo}-thread time / median {hi}-thread time):")
        for m in models:
            print(f"  {m['name']:10} prefill "
                  f"{statistics.median(m['prefill_s'][lo]) / statistics.median(m['prefill_s'][hi]):5.2f}"
                  f"  decode {statistics.median(m['decode_s'][lo]) / statistics.median(m['decode_s'][hi]):5.2f}")
    print(f"total {time.perf_counter() - t0:.0f} s")
    doc = {"model": args.model, "settings": vars(args), "torch": torch.__version__,
           "transformers": transformers.__version__, "rows": rows}
    suffix = "" if args.threads == [2] else "-threads" + "-".join(map(str, args.threads))
    target = Path(args.out) if args.out else HERE / "results" / f"factorized_latency{suffix}.json"
    target.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"wrote {target}")
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
