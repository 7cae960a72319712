"""The four fine-tuning methods against plain PEFT LoRA, in one run (issue 3's benchmark).

For each method (lora = plain PEFT LoRA, the reference; lora-pro; bone; loldu) on the same model, data,
targets (every decoder-block linear), rank, batch and number of steps, through the project's training loop:

    step s        median wall time of one optimizer step (forward, backward, optimizer), first step excluded
    x lora        step time / LoRA's step time (issue target: lora-pro <= 1.3)
    peak RSS      the worker process's peak resident memory (each method runs in its own fresh process, so
                  peaks do not carry over; it includes the model, activations and the Python runtime)
    opt state     bytes of the optimizer's state tensors after training (the part that differs by method;
                  deterministic, unlike RSS)
    trainable     trainable parameters
    eval before / after   held-out loss before training and after the steps

Data: `stdlib-prose` by default (the stdlib's documentation topics: English prose, a shift from the code the
demo model was trained on, so there is something to learn in a few steps), held-out by its "eval" part.
Every method trains on the same examples in the same order (same seed). Each method's learning rate and
alpha are `lowrank finetune`'s defaults for it (methods/finetune/spec.py DEFAULTS: lr 2e-4 and alpha 16;
loldu lr 1e-3 and alpha 8) unless --lr / --alpha override them for every method; warmup 0.03 and gradient
clipping 1.0 as the CLI. What differs from the CLI's defaults: --seq-len 256 (CLI 512), the number of
steps, and the data (stdlib-prose; the CLI's default is the stdlib's code).
On a shared 2-core CPU the absolute seconds are noisy; the ratios to LoRA come from the same run.

    python benchmarks/finetune_methods.py                                   # demo model, 30 steps
    python benchmarks/finetune_methods.py --model smollm2 --steps 30 --seq-len 256
    python benchmarks/finetune_methods.py --steps 4 --seq-len 64 --batch-size 2 --eval-examples 4   # smoke

Prints a table; writes benchmarks/results/finetune_methods_<model>.json (settings + every figure).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from smollm2 import model_path  # noqa: E402  (beside this script)

METHODS = ("lora", "lora-pro", "bone", "loldu")


class StepTimer:
    """Wall time of each optimizer step (callback hooks of lowrank_cli.train.loop)."""

    def __init__(self):
        self.times, self._start = [], None

    def on_step_start(self, model, step):
        self._start = time.perf_counter()

    def on_before_optimizer_step(self, model, step):
        pass

    def on_step_end(self, model, step, logs):
        self.times.append(time.perf_counter() - self._start)

    def state_dict(self):
        return {}

    def load_state_dict(self, state):
        pass


def worker(args) -> dict:
    """One method in this (fresh) process; returns its figures."""
    import torch

    from lowrank_cli.utils.memory import peak_rss_bytes

    torch.set_num_threads(args.threads)
    from lowrank_cli.api.common import load_tokenizer
    from lowrank_cli.io.resolve import resolve_model
    from lowrank_cli.methods.finetune.registry import get_method
    from lowrank_cli.methods.finetune.spec import AdapterSpec, default
    from lowrank_cli.methods.finetune.targets import module_names, resolve_targets
    from lowrank_cli.modeling.export import load_model
    from lowrank_cli.train.data import build_datasets, collate_fn
    from lowrank_cli.train.loop import LoopConfig, train

    path = resolve_model(model_path(args.model))
    tokenizer = load_tokenizer(path)
    budget = args.steps * args.batch_size * args.seq_len
    data = build_datasets(tokenizer, args.data, max_seq_len=args.seq_len, seed=0, token_budget=budget,
                          max_eval_examples=args.eval_examples)
    net = load_model(path, dtype=torch.float32)
    net.requires_grad_(False)
    alpha = args.alpha if args.alpha is not None else default(args.worker, "alpha")
    spec = AdapterSpec(method=args.worker, rank=args.rank, alpha=alpha,
                       targets=module_names(resolve_targets(net, None, rank=args.rank)))
    method = get_method(args.worker)
    torch.manual_seed(0)
    net = method.attach(net, spec)
    lr = args.lr if args.lr is not None else default(args.worker, "lr")
    optimizer = method.optimizer(net, spec, lr=lr)
    timer = StepTimer()
    config = LoopConfig(max_steps=args.steps, batch_size=args.batch_size, warmup=0.03, device="cpu", seed=0)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    out = train(net, optimizer, data.train, config=config, collate=collate_fn(pad), eval_dataset=data.eval,
                callbacks=[timer])
    state_bytes = sum(t.numel() * t.element_size() for s in optimizer.state.values() for t in s.values()
                      if torch.is_tensor(t))
    steps = timer.times[1:] or timer.times
    trainable = sum(p.numel() for p in net.parameters() if p.requires_grad)
    return {"method": args.worker, "lr": lr, "alpha": alpha, "trainable": trainable, "modules": len(spec.targets),
            "step_s": statistics.median(steps), "step_s_all": timer.times,
            "peak_rss_bytes": peak_rss_bytes(),
            "optimizer_state_bytes": state_bytes, "eval_before": out.initial_eval_loss,
            "eval_after": out.final_eval_loss, "train_loss_last": out.final_train_loss, "tokens": out.tokens}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="demo", help="demo, smollm2, or a checkpoint folder")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--data", default="stdlib-prose", help="training data (held out: its eval part)")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--lr", type=float, default=None, help="every method (default: each one's CLI default)")
    parser.add_argument("--alpha", type=float, default=None, help="every method (default: each one's CLI default)")
    parser.add_argument("--eval-examples", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--worker", choices=METHODS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args)))
        return

    methods = ["lora"] + [m for m in args.methods if m != "lora"]  # the reference always runs
    rows = []
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
    passthrough = ["--model", args.model, "--data", args.data, "--steps", str(args.steps),
                   "--batch-size", str(args.batch_size),
                   "--seq-len", str(args.seq_len), "--rank", str(args.rank),
                   "--eval-examples", str(args.eval_examples), "--threads", str(args.threads)]
    passthrough += ["--lr", str(args.lr)] if args.lr is not None else []
    passthrough += ["--alpha", str(args.alpha)] if args.alpha is not None else []
    for name in methods:
        proc = subprocess.run([sys.executable, __file__, *passthrough, "--worker", name], capture_output=True,
                              text=True, env=env)
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
        if proc.returncode != 0 or not lines:
            tail = (proc.stderr.strip().splitlines() or ["?"])[-1]
            print(f"{name}: failed ({tail})", file=sys.stderr)
            rows.append({"method": name, "error": tail})
            continue
        rows.append(json.loads(lines[-1]))
    ref = next((r for r in rows if r["method"] == "lora" and "error" not in r), None)
    header = (f"{'method':<9} {'trainable':>10} {'step s':>8} {'x lora':>7} {'peak RSS MiB':>13} "
              f"{'opt state MiB':>14} {'eval before':>12} {'eval after':>11}")
    print(header)
    print("-" * len(header))
    for r in rows:
        if "error" in r:
            print(f"{r['method']:<9} failed: {r['error']}")
            continue
        ratio = r["step_s"] / ref["step_s"] if ref else float("nan")
        r["step_ratio_vs_lora"] = ratio
        r["rss_ratio_vs_lora"] = r["peak_rss_bytes"] / ref["peak_rss_bytes"] if ref else None
        print(f"{r['method']:<9} {r['trainable']:>10,} {r['step_s']:>8.4f} {ratio:>7.2f} "
              f"{r['peak_rss_bytes'] / 2**20:>13.0f} {r['optimizer_state_bytes'] / 2**20:>14.3f} "
              f"{r['eval_before']:>12.4f} {r['eval_after']:>11.4f}")
    out = HERE / "results" / f"finetune_methods_{Path(args.model).name}.json"
    out.parent.mkdir(exist_ok=True)
    settings = {k: v for k, v in vars(args).items() if k != "worker"}
    out.write_text(json.dumps({"settings": settings, "rows": rows}, indent=2) + "\n")
    print(f"\nwritten: {out.relative_to(HERE.parent)}")


if __name__ == "__main__":
    main()
