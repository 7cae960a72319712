"""Training-step time and peak memory of LoRA-Pro (efficient / full) against plain PEFT LoRA + AdamW.

A random-weight Llama with SmolLM2-135M's shapes (hidden 576, intermediate 1536, 9/3 heads, vocab 49152, tied
embeddings) but only `--layers` blocks (default 4); LoRA r 8, alpha 16 on all 7 projections of every block; one
training step = forward + backward of a `--batch` x `--seq` batch of random tokens + optimizer.step().

    step     forward + backward + optimizer step (what a training run pays per step)
    opt      optimizer.step() alone (LoRA-Pro's closed form, Sylvester solve, and Adam)
    state    bytes held in optimizer.state (exact)
    peak     peak memory that `--mem-steps` training steps (default 2: the second runs with the optimizer
             state allocated) add over the built model: VmHWM minus VmRSS after building (Linux, after
             resetting VmHWM), or torch.cuda.max_memory_allocated on a GPU; each method in a fresh subprocess

Timing: the three models are built in one process and timed interleaved (the order rotates every repeat), so
background load on a shared machine hits all alike; medians over repeats; ratio = method / lora. Target (issue
3): lora-pro (efficient) at most 1.3x LoRA's step time; the published implementation is about 1.65x with m x n
Adam state (the "full" row here).

    OMP_NUM_THREADS=1 python benchmarks/lora_pro_step.py               # default: 4 layers, 4 x 256, 3 repeats
    python benchmarks/lora_pro_step.py --layers 30 --repeats 10        # SmolLM2-135M depth
    python benchmarks/lora_pro_step.py --device cuda --layers 30 --batch 8 --seq 1024

Prints a table; writes benchmarks/results/lora_pro_step.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

METHODS = {"lora": ("lora", "efficient"), "lora-pro": ("lora_pro", "efficient"), "lora-pro-full": ("lora_pro", "full")}


def build(method: str, args):
    import importlib

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from lowrank_cli.methods.finetune.spec import AdapterSpec

    cfg = LlamaConfig(hidden_size=576, intermediate_size=1536, num_hidden_layers=args.layers, num_attention_heads=9,
                      num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True,
                      max_position_embeddings=max(2048, args.seq))
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).to(args.device)
    targets = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in n]
    module_name, mode = METHODS[method]
    module = importlib.import_module(f"lowrank_cli.methods.finetune.{module_name}")
    spec = AdapterSpec(method=method, targets=targets, rank=args.rank, alpha=2 * args.rank, lora_pro_mode=mode)
    model = module.attach(model, spec)
    model.train()
    return model, module.optimizer(model, spec, lr=1e-4)


def batch(args, seed: int):
    import torch

    ids = torch.randint(0, 49152, (args.batch, args.seq), generator=torch.Generator().manual_seed(seed))
    ids = ids.to(args.device)
    return {"input_ids": ids, "labels": ids}


def one_step(model, opt, data, device: str) -> tuple[float, float]:
    import torch

    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    sync()
    t0 = time.perf_counter()
    model(**data).loss.backward()
    sync()
    t1 = time.perf_counter()
    opt.step()
    opt.zero_grad(set_to_none=True)
    sync()
    t2 = time.perf_counter()
    return t2 - t0, t2 - t1


def state_bytes(opt) -> int:
    return sum(t.numel() * t.element_size() for st in opt.state.values() for t in st.values()
               if hasattr(t, "numel") and t.dim() > 0)


def _status(key: bytes) -> int:
    with open("/proc/self/status", "rb") as fh:
        for line in fh:
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    return 0


def worker(method: str, args) -> dict:
    """Peak memory of `args.mem_steps` training steps of one method, measured in this fresh process."""
    import torch

    model, opt = build(method, args)
    data = batch(args, 0)
    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        try:
            Path("/proc/self/clear_refs").write_text("5")  # VmHWM := current VmRSS
        except OSError:
            pass
        base = _status(b"VmRSS:")
    for _ in range(args.mem_steps):
        one_step(model, opt, data, args.device)
    peak = torch.cuda.max_memory_allocated() if args.device.startswith("cuda") else _status(b"VmHWM:")
    return {"peak_added_bytes": peak - base, "state_bytes": state_bytes(opt)}


def timing(args) -> dict[str, dict]:
    built = {m: build(m, args) for m in METHODS}
    data = batch(args, 1)
    for model, opt in built.values():  # warm-up (allocations, first-step state)
        one_step(model, opt, data, args.device)
    runs = {m: {"step": [], "opt": []} for m in METHODS}
    names = list(METHODS)
    for rep in range(args.repeats):
        for m in names[rep % len(names):] + names[:rep % len(names)]:
            step, opt_t = one_step(*built[m], data, args.device)
            runs[m]["step"].append(step)
            runs[m]["opt"].append(opt_t)
    return runs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--mem-steps", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--worker", choices=list(METHODS), help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, default=HERE / "results" / "lora_pro_step.json")
    args = ap.parse_args()

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.worker:
        print(json.dumps(worker(args.worker, args)))
        return

    runs = timing(args)
    memory = {}
    for m in METHODS:
        cmd = [sys.executable, __file__, "--worker", m] + [a for a in sys.argv[1:] if a != "--worker"]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
        memory[m] = json.loads(out)

    base_step = statistics.median(runs["lora"]["step"])
    rows = []
    for m in METHODS:
        step, opt_t = statistics.median(runs[m]["step"]), statistics.median(runs[m]["opt"])
        rows.append({"method": m, "step_s": step, "opt_s": opt_t, "ratio": step / base_step,
                     "state_mb": memory[m]["state_bytes"] / 2**20, "peak_mb": memory[m]["peak_added_bytes"] / 2**20,
                     "steps_s": runs[m]["step"], "opt_steps_s": runs[m]["opt"]})
    print(f"{'method':<15}{'step s':>9}{'opt s':>9}{'x lora':>8}{'state MB':>10}{'peak MB':>10}")
    for r in rows:
        print(f"{r['method']:<15}{r['step_s']:>9.3f}{r['opt_s']:>9.4f}{r['ratio']:>8.2f}"
              f"{r['state_mb']:>10.1f}{r['peak_mb']:>10.1f}")
    settings = {k: v for k, v in vars(args).items() if k not in ("worker", "out")}
    settings.update(torch=torch.__version__, threads=torch.get_num_threads())
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"settings": settings, "rows": rows}, indent=1) + "\n", encoding="utf-8")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
