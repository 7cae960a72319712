"""The LM head's share of decompose's Fisher sensitivity pass on a large vocabulary: the hand-made chunked
head gradient against autograd through the head, each in a fresh process (wall time, peak RSS).

A 2-block Llama with hidden 64 and a 262,144-token vocabulary (Gemma 3's size): the head is almost all of
the work, so the figures are the head's. Both paths do two head matmuls per token; autograd also holds the
whole batch's float32 logits, log-softmax and gradient.

    python benchmarks/sensitivity_head.py                    # 1 x 512 tokens
    python benchmarks/sensitivity_head.py --seq-len 256 --vocab 131072

Prints one line per path and the ratios; writes benchmarks/results/sensitivity_head.json.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def build(folder: Path, vocab: int) -> None:
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=vocab, max_position_embeddings=1024,
                         tie_word_embeddings=False)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)


def worker(folder: str, path: str, seq_len: int, vocab: int) -> dict:
    import resource

    import torch

    from lowrank_cli.engine.streamed import StreamedModel
    from lowrank_cli.io.checkpoint import Checkpoint
    from lowrank_cli.methods.decompose import sensitivity

    torch.set_num_threads(1)
    windows = torch.randint(0, vocab, (1, seq_len), generator=torch.Generator().manual_seed(0))
    streamed = StreamedModel(Checkpoint(folder))
    hidden = next(iter(streamed.run_blocks(streamed.capture(windows, 1))))
    with streamed._outer_loaded():
        head = sensitivity._HeadGradient(streamed)
        head.checked, head.by_hand = True, path == "by-hand"
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        start = time.perf_counter()
        grad = head.hidden_grad(hidden, windows)
        seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"path": path, "seconds": seconds, "peak_rss_bytes": peak, "rss_growth_bytes": peak - before,
            "grad_norm": float(grad.double().norm())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab", type=int, default=262144)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker[0], args.worker[1], args.seq_len, args.vocab)))
        return
    rows = []
    with tempfile.TemporaryDirectory(prefix="sens-head-") as tmp:
        build(Path(tmp), args.vocab)
        for path in ("autograd", "by-hand"):
            proc = subprocess.run([sys.executable, __file__, "--vocab", str(args.vocab), "--seq-len",
                                   str(args.seq_len), "--worker", tmp, path], capture_output=True, text=True,
                                  check=True)
            rows.append(json.loads([ln for ln in proc.stdout.splitlines() if ln.startswith("{")][-1]))
    for r in rows:
        print(f"{r['path']:<9} {r['seconds']:7.3f} s  RSS growth {r['rss_growth_bytes'] / 2**20:8.1f} MiB  "
              f"|grad| {r['grad_norm']:.6g}")
    old, new = rows
    print(f"by-hand / autograd: time {new['seconds'] / old['seconds']:.2f}, "
          f"RSS growth {new['rss_growth_bytes'] / max(old['rss_growth_bytes'], 1):.3f}")
    out = HERE / "results" / "sensitivity_head.json"
    out.write_text(json.dumps({"settings": {"vocab": args.vocab, "seq_len": args.seq_len, "hidden": 64,
                                            "threads": 1}, "rows": rows}, indent=2) + "\n")
    print(f"wrote {out.relative_to(HERE.parent)}")


if __name__ == "__main__":
    main()
