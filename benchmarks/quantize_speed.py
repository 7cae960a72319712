"""GPTQ wall time of `lowrank quantize` against gptqmodel and llm-compressor at equal settings, one run.

Every tool quantizes the same checkpoint on the same 16 x 512 calibration windows (lowrank's default
calibration text, stdlib code, its calib part) to the same grid: 4-bit, symmetric, groups of 64 (llm-compressor
refuses groups of 128 on SmolLM2's 576-wide layers), no act-order, damping 0.01, every block linear
(lm_head left alone). lowrank runs with its default, and again with each setting of `--true-sequential`
(one halted forward per input group of a block, or one forward for all of a block's groups: llm-compressor's
way). Each tool runs in a fresh process, one after the other; its time is the whole job:
load the model, calibrate, solve, pack and save. lowrank runs with `--eval-tokens 0` (it otherwise measures
the baseline and quantized perplexity in the same pass, which the others do not do).
Quality is kept if the outputs agree: every output is read back dequantized (lowrank's and gptqmodel's with
lowrank's loader, llm-compressor's with transformers + compressed-tensors in its own environment) and
measured on the same 4096 held-out code tokens with the same loop.

llm-compressor pins other transformers versions than lowrank, so it runs from its own virtual environment:

    python -m venv /work/llmc-venv && /work/llmc-venv/bin/pip install torch==2.13.0 llmcompressor
    python benchmarks/quantize_speed.py --model smollm2 --llmcompressor-python /work/llmc-venv/bin/python

Prints a table; writes benchmarks/results/quantize_speed-<model>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from smollm2 import model_path  # noqa: E402  (beside this script)

GRID = dict(bits=4, group_size=64, sym=True, act_order=False, damp=0.01)
TOOLS = ("lowrank", "lowrank-true-sequential", "lowrank-one-forward", "gptqmodel", "llmcompressor")


# -- workers: one tool per fresh process --------------------------------------------------------------------
def quantize_lowrank(src: str, out: str, calib: list, **extra) -> None:
    from lowrank_cli.api.quantize import QuantizeOptions, quantize

    quantize(src, QuantizeOptions(output=out, calib_samples=len(calib), calib_seq_len=len(calib[0]), eval_tokens=0,
                                  **GRID, **extra))


def quantize_gptqmodel(src: str, out: str, calib: list) -> None:
    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")
    from gptqmodel import GPTQModel, QuantizeConfig

    from lowrank_cli.utils.third_party import gptqmodel_logs_elsewhere

    qcfg = QuantizeConfig(bits=GRID["bits"], group_size=GRID["group_size"], sym=GRID["sym"],
                          desc_act=GRID["act_order"], damp_percent=GRID["damp"])
    model = GPTQModel.load(src, qcfg)
    rows = [{"input_ids": w, "attention_mask": [1] * len(w)} for w in calib]
    with gptqmodel_logs_elsewhere():
        model.quantize(rows, batch_size=1)
    model.save(out)


def quantize_llmcompressor(src: str, out: str, calib: list) -> None:
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import GPTQModifier
    from transformers import AutoModelForCausalLM

    weights = {"num_bits": GRID["bits"], "type": "int", "symmetric": GRID["sym"], "strategy": "group",
               "group_size": GRID["group_size"]}
    recipe = GPTQModifier(config_groups={"group_0": {"targets": ["Linear"], "weights": weights}}, ignore=["lm_head"],
                          dampening_frac=GRID["damp"])
    model = AutoModelForCausalLM.from_pretrained(src, dtype="auto")
    data = Dataset.from_dict({"input_ids": calib, "attention_mask": [[1] * len(w) for w in calib]})
    oneshot(model=model, dataset=data, recipe=recipe, max_seq_length=len(calib[0]),
            num_calibration_samples=len(calib), shuffle_calibration_samples=False)
    model.save_pretrained(out, save_compressed=True)


def load_for_eval(tool: str, folder: str):
    if tool == "llmcompressor":
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(folder, dtype="float32")
    import torch

    from lowrank_cli.modeling.export import load_model

    return load_model(folder, dequantize=True, dtype=torch.float32)


def perplexity(model, windows: list) -> float:
    """exp(mean next-token NLL) over every window (each window scored from its second token)."""
    import math

    import torch

    total, count = 0.0, 0
    with torch.no_grad():
        for w in windows:
            ids = torch.tensor([w])
            logits = model(ids).logits.float()
            nll = torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:], reduction="sum")
            total, count = total + nll.item(), count + len(w) - 1
    return math.exp(total / count)


def worker(tool: str, src: str, out: str, windows_file: str) -> None:
    doc = json.loads(Path(windows_file).read_text())
    start = time.perf_counter()
    {"lowrank": quantize_lowrank, "gptqmodel": quantize_gptqmodel, "llmcompressor": quantize_llmcompressor,
     # lowrank with each way of measuring a block's Hessians (the plain row is the command's default)
     "lowrank-true-sequential": lambda *a: quantize_lowrank(*a, true_sequential=True),
     "lowrank-one-forward": lambda *a: quantize_lowrank(*a, true_sequential=False),
     }[tool](src, out, doc["calib"])
    seconds = time.perf_counter() - start
    ppl = perplexity(load_for_eval(tool, out), doc["eval"]) if doc["eval"] else None
    print("RESULT " + json.dumps({"tool": tool, "seconds": round(seconds, 1), "eval_perplexity": ppl}), flush=True)


# -- the driver ---------------------------------------------------------------------------------------------
def windows(src: str, calib_samples: int, eval_tokens: int) -> dict:
    """The calibration and eval windows lowrank quantize itself would use (its data code, its defaults)."""
    from lowrank_cli.api.common import load_tokenizer, solver_windows
    from lowrank_cli.api.quantize import QuantizeOptions

    opts = QuantizeOptions(output="unused", calib_samples=calib_samples, eval_tokens=eval_tokens)
    w = solver_windows(load_tokenizer(src), opts)
    return {"calib": w.calib.tolist(), "eval": w.eval.tolist()}


def run_tool(python: str, tool: str, src: str, tmp: Path, windows_file: Path) -> dict:
    out = tmp / tool
    cmd = [python, str(Path(__file__).resolve()), "--worker", tool, "--model", src, "--out", str(out),
           "--windows", str(windows_file)]
    env = {**os.environ, "PYTHONPATH": str(HERE.parent)}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        return {"tool": tool, "error": " | ".join(tail)}
    return json.loads(lines[-1][len("RESULT "):])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="demo")
    parser.add_argument("--tools", nargs="+", default=list(TOOLS), choices=TOOLS)
    parser.add_argument("--calib-samples", type=int, default=16)
    parser.add_argument("--eval-tokens", type=int, default=4096)
    parser.add_argument("--llmcompressor-python", default=None, help="python of an environment with "
                        "llmcompressor installed (it pins its own transformers)")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--out", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--windows", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args.model, args.out, args.windows)
        return
    from lowrank_cli.io.resolve import resolve_model

    src = str(resolve_model(model_path(args.model)))  # a folder every tool can open ('demo' included)
    rows = []
    with tempfile.TemporaryDirectory(prefix="qspeed-") as tmp:
        windows_file = Path(tmp) / "windows.json"
        windows_file.write_text(json.dumps(windows(src, args.calib_samples, args.eval_tokens)))
        for tool in args.tools:
            python = args.llmcompressor_python if tool == "llmcompressor" else sys.executable
            if python is None:
                rows.append({"tool": tool, "error": "no --llmcompressor-python given"})
                continue
            rows.append(run_tool(python, tool, src, Path(tmp), windows_file))
            print(rows[-1], flush=True)
    ours = next((r["seconds"] for r in rows if r["tool"] == "lowrank" and "seconds" in r), None)
    for r in rows:
        if ours and "seconds" in r:
            r["lowrank_vs_this"] = round(ours / r["seconds"], 3)
    doc = {"model": args.model, "grid": GRID, "calib": f"{args.calib_samples} x 512 stdlib code (calib part)",
           "eval": f"{args.eval_tokens} held-out stdlib code tokens", "rows": rows,
           "command": "python benchmarks/quantize_speed.py " + " ".join(sys.argv[1:])}
    print(f"{'tool':<15}{'seconds':>9}{'lowrank/this':>14}{'eval ppl':>10}")
    for r in rows:
        if "error" in r:
            print(f"{r['tool']:<15} failed: {r['error'][:90]}")
            continue
        ppl = f"{r['eval_perplexity']:.3f}" if r["eval_perplexity"] else "-"
        print(f"{r['tool']:<15}{r['seconds']:>9.1f}{r.get('lowrank_vs_this', 0):>14.2f}{ppl:>10}")
    out = HERE / "results" / f"quantize_speed-{Path(args.model).name}.json"
    out.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
