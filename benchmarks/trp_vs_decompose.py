"""TRP against decompose, at equal final parameter count and equal training tokens (issue: trp-train).

Three ways to reach the same factorized size from a pretrained model:

    trp             `trp-train`: full-parameter training with periodic truncation + nuclear sub-gradient, then
                    the final factorization (--final-rule); sets the size (its kept fraction of the targeted
                    params)
    lord            `decompose --method lord --params-ratio <trp's kept fraction> --rank-multiple 1`: no training
    lord+lora       the lord model fine-tuned with LoRA (`finetune`, same steps, batch, sequence length and data
                    as trp, so the same training tokens), folded into its factors with `merge`

All perplexities are measured the same way (`lowrank eval`: held-out stdlib code, --seq-len windows,
--eval-tokens tokens). TRP's overhead is measured against plain full-parameter training (the same loop, data
and model, no callback): mean step time of plain steps, of TRP steps (truncation included), and the total.

TRP settings: --setup paper is the paper's code (SGD momentum 0.9, energy 0.9, lambda 3e-4, period 5, final
singular-value threshold 0.05) at trp-train's SGD lr; --setup cli is trp-train's defaults (energy 0.99);
any of --optimizer/--lr/--energy/--nuclear-weight/--final-* given explicitly overrides the setup.

    python benchmarks/trp_vs_decompose.py --model demo --steps 20 --seq-len 128 --eval-tokens 2048   # tiny
    python benchmarks/trp_vs_decompose.py --model demo --steps 60 --seq-len 128 --setup paper
    python benchmarks/trp_vs_decompose.py --model demo --steps 60 --seq-len 128 --setup cli
    python benchmarks/trp_vs_decompose.py --model smollm2 --steps 300 --seq-len 256 --device cuda

Prints a table; writes benchmarks/results/trp_vs_decompose-<model>-<setup>.json.
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

# TRP settings by name (see the module docstring); the lr and nuclear weight default per optimizer
SETUPS = {
    "paper": {"optimizer": "sgd", "energy": 0.9, "nuclear_weight": 3e-4, "final_rule": "threshold",
              "final_threshold": 0.05, "final_energy": 0.99},
    "cli": {"optimizer": "sgd", "energy": 0.99, "final_rule": "threshold", "final_threshold": 0.05,
            "final_energy": 0.99},
}


def plain_training(model: str, args) -> dict:
    """The shared loop on the same model and data without TRP: the step time TRP is compared with."""
    import torch

    from lowrank_cli.api.common import load_tokenizer
    from lowrank_cli.api.trp_flow import StepTimer
    from lowrank_cli.io.resolve import resolve_model
    from lowrank_cli.modeling.export import load_model
    from lowrank_cli.train.data import build_datasets, collate_fn
    from lowrank_cli.train.loop import LoopConfig, train

    path = resolve_model(model)
    tokenizer = load_tokenizer(path)
    data = build_datasets(tokenizer, None, None, max_seq_len=args.seq_len, seed=0,
                          token_budget=args.steps * args.batch_size * args.seq_len, max_eval_examples=8)
    from lowrank_cli.methods.trp.optim import make_optimizer

    net = load_model(path, dtype=torch.float32, device=args.device)
    timer = StepTimer(lambda step: False, cuda=args.device.startswith("cuda"))
    config = LoopConfig(lr=args.lr, max_steps=args.steps, batch_size=args.batch_size,
                        device="cpu" if args.device == "cpu" else "auto", eval_at_start=False)
    optimizer = make_optimizer(list(net.parameters()), args.optimizer, lr=args.lr)
    start = time.perf_counter()
    outcome = train(net, optimizer, data.train, config=config, collate=collate_fn(tokenizer.pad_token_id or 0),
                    callbacks=[timer])
    return {"seconds": time.perf_counter() - start, "steps": outcome.steps, "tokens": outcome.tokens,
            "mean_step_s": sum(timer.plain) / max(1, len(timer.plain))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="demo", help="demo, smollm2, or a checkpoint folder")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--setup", choices=sorted(SETUPS), default="cli")
    parser.add_argument("--period", type=int, default=5)
    parser.add_argument("--optimizer", choices=["sgd", "adamw"], default=None)
    parser.add_argument("--energy", type=float, default=None)
    parser.add_argument("--nuclear-weight", type=float, default=None)
    parser.add_argument("--final-rule", choices=["threshold", "energy"], default=None)
    parser.add_argument("--final-threshold", type=float, default=None)
    parser.add_argument("--final-energy", type=float, default=None)
    parser.add_argument("--lr", type=float, default=None, help="trp-train (full-parameter) learning rate")
    parser.add_argument("--lora-rank", type=int, default=8)
    parser.add_argument("--lora-lr", type=float, default=2e-4)
    parser.add_argument("--calib-samples", type=int, default=16)
    parser.add_argument("--eval-tokens", type=int, default=4096)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", default=None, help="JSON path (default benchmarks/results/...)")
    args = parser.parse_args()
    for key, value in SETUPS[args.setup].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    from lowrank_cli.methods.trp.optim import DEFAULTS

    args.lr = DEFAULTS[args.optimizer]["lr"] if args.lr is None else args.lr
    args.nuclear_weight = (DEFAULTS[args.optimizer]["nuclear_weight"] if args.nuclear_weight is None
                           else args.nuclear_weight)

    from lowrank_cli.api.decompose import DecomposeOptions, decompose
    from lowrank_cli.api.evaluate import evaluate
    from lowrank_cli.api.finetune import FinetuneOptions, finetune
    from lowrank_cli.api.merge import MergeOptions, merge
    from lowrank_cli.api.trp import TRPOptions, trp_train
    from lowrank_cli.io.checkpoint import Checkpoint
    from lowrank_cli.io.resolve import resolve_model

    model = model_path(args.model)
    rows, timings = [], {}

    def ppl(folder) -> float:
        return evaluate(str(folder), seq_len=args.seq_len, max_tokens=args.eval_tokens,
                        device=args.device).perplexity

    with tempfile.TemporaryDirectory(prefix="trp-bench-") as tmp:
        tmp = Path(tmp)
        original = ppl(model)
        base_params = Checkpoint(resolve_model(model)).num_params()
        rows.append({"method": "original", "params": base_params, "train_tokens": 0, "perplexity": original})

        start = time.perf_counter()
        trp = trp_train(model, TRPOptions(
            output=str(tmp / "trp"), max_steps=args.steps, batch_size=args.batch_size, max_seq_len=args.seq_len,
            period=args.period, energy=args.energy, nuclear_weight=args.nuclear_weight, optimizer=args.optimizer,
            final_rule=args.final_rule, final_threshold=args.final_threshold, final_energy=args.final_energy,
            lr=args.lr, eval_tokens=args.eval_tokens, max_eval_examples=8,
            device=args.device))
        timings["trp"] = time.perf_counter() - start
        keep = trp.params["targeted_ratio"]
        rows.append({"method": "trp", "params": trp.params["model_after"], "kept": keep,
                     "train_tokens": trp.training["tokens"], "perplexity": ppl(tmp / "trp"),
                     "trained_dense_perplexity": trp.perplexity["trained"],
                     "factorized_layers": len(trp.ranks), "targeted_layers": trp.params["targeted_layers"]})

        start = time.perf_counter()
        lord = decompose(model, DecomposeOptions(
            output=str(tmp / "lord"), method="lord", params_ratio=min(1.0, keep), rank_multiple=1,
            calib_samples=args.calib_samples, calib_seq_len=args.seq_len, eval_tokens=args.eval_tokens,
            device=args.device))
        timings["lord"] = time.perf_counter() - start
        rows.append({"method": "lord", "params": lord.params["model_after"],
                     "kept": lord.params["targeted_ratio"], "train_tokens": 0, "perplexity": ppl(tmp / "lord"),
                     "factorized_layers": len(lord.ranks), "targeted_layers": lord.params["targeted_layers"]})

        start = time.perf_counter()
        # LoRA on both factors of each layer: its rank cannot exceed the smallest factor rank
        lora_rank = min([args.lora_rank, *lord.ranks.values()])
        ft = finetune(str(tmp / "lord"), FinetuneOptions(
            output=str(tmp / "lora"), method="lora", rank=lora_rank, alpha=2.0 * lora_rank,
            lr=args.lora_lr, max_steps=args.steps, batch_size=args.batch_size, max_seq_len=args.seq_len,
            max_eval_examples=8, device=args.device))
        merged = merge(str(tmp / "lord"), MergeOptions(output=str(tmp / "lord-lora"), adapter=str(tmp / "lora")))
        timings["lord+lora"] = time.perf_counter() - start
        rows.append({"method": "lord+lora", "params": merged.params["after"], "kept": lord.params["targeted_ratio"],
                     "lora_rank": lora_rank,
                     "train_tokens": ft.tokens, "perplexity": ppl(tmp / "lord-lora"),
                     "factorized_layers": len(merged.ranks), "targeted_layers": lord.params["targeted_layers"]})

        plain = plain_training(model, args)

    overhead = dict(trp.overhead)
    overhead["plain_run_mean_step_s"] = plain["mean_step_s"]
    overhead["trp_run_train_s"] = trp.training["step_mean_s"] * trp.training["steps"] \
        if trp.training.get("step_mean_s") else None
    overhead["plain_run_train_s"] = plain["seconds"]
    print(f"model {args.model}: {args.steps} steps x {args.batch_size} x {args.seq_len} tokens; "
          f"perplexity on {args.eval_tokens} held-out stdlib tokens")
    print(f"TRP ({args.setup}): {args.optimizer} lr {args.lr:g}, energy {args.energy}, period {args.period}, "
          f"lambda {args.nuclear_weight:g}, final {args.final_rule} "
          f"{args.final_threshold if args.final_rule == 'threshold' else args.final_energy}")
    print(f"{'method':<10} {'params':>12} {'kept':>7} {'train tok':>10} {'ppl':>10}")
    for r in rows:
        kept = f"{r['kept']:.3f}" if "kept" in r else "-"
        print(f"{r['method']:<10} {r['params']:>12,} {kept:>7} {r['train_tokens']:>10,} {r['perplexity']:>10.3f}")
    print(f"TRP: {trp.rank_history['trp_steps']} truncation steps, {overhead['trp_seconds']:.2f} s in SVDs "
          f"({(overhead['total_fraction'] or 0) * 100:.1f}% of the rest of training); mean TRP step "
          f"{overhead['mean_trp_step_s'] or float('nan'):.3f} s, plain step in the TRP run "
          f"{overhead['mean_plain_step_s'] or float('nan'):.3f} s, plain training run {plain['mean_step_s']:.3f} s")
    out = Path(args.out) if args.out else HERE / "results" / f"trp_vs_decompose-{args.model}-{args.setup}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"settings": vars(args), "rows": rows, "overhead": overhead,
                               "trp_rank_history": trp.rank_history, "plain": plain, "timings_s": timings},
                              indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
