"""GPTQ's solver alone: this build's column loop against the loop it replaced, in one process (issue: pipeline).

The four solves of one SmolLM2 block (q/k/v stacked 960 x 576, o 576 x 576, gate/up stacked 3072 x 576, down
576 x 1536) on random weights and correlated random activations (8192 tokens), 4-bit symmetric, groups of 64,
no act-order, one thread (as the pipeline runs them). Three loops, alternating, `--repeats` times:

    previous   the loop before this build (float64, column-major, kept below for this comparison)
    float64    this build's loop in float64 (`gptq_quantize(dtype=torch.float64)`: transposed weight, H^-1's rows
               pre-divided by their diagonal; matches a direct float64 reference code for code)
    float32    this build's default (float64 Cholesky factors, float32 loop)

Reports the best seconds per block and each solve's output error energy tr(dW H dW^T) / 1e6.

    python benchmarks/gptq_solver.py

Prints a table; writes benchmarks/results/gptq_solver.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
SHAPES = [(960, 576), (576, 576), (3072, 576), (576, 1536)]


def previous_loop(weight, hessian, grid, damp=0.01):
    """The column loop before this build, no act-order (its arithmetic, kept for the comparison)."""
    import torch

    from lowrank_cli.methods.quantize.grid import find_params

    W = weight.to(torch.float64).clone()
    H = hessian.to(torch.float64).clone()
    rows, cols = W.shape
    H += damp * torch.mean(torch.diag(H)) * torch.eye(cols, dtype=H.dtype)
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    gs = grid.group_size
    Q = torch.zeros_like(W)
    for i1 in range(0, cols, gs):
        i2 = min(i1 + gs, cols)
        W1, Hinv1 = W[:, i1:i2].clone(), Hinv[i1:i2, i1:i2]
        Err1 = torch.zeros_like(W1)
        diag = Hinv1.diagonal().tolist()
        scale, zero = find_params(W1, grid)
        for i in range(i2 - i1):
            w = W1[:, i]
            q = torch.round(w / scale).add_(zero).clamp_(0, grid.maxq)
            Q[:, i1 + i] = q
            err = Err1[:, i]
            torch.sub(w, (q - zero).mul_(scale), out=err).div_(diag[i])
            W1[:, i + 1:].addr_(err, Hinv1[i, i + 1:], alpha=-1)
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    return Q


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    import torch

    from lowrank_cli.engine.calibration import output_energy
    from lowrank_cli.methods.quantize.gptq import gptq_quantize
    from lowrank_cli.methods.quantize.grid import Grid

    torch.manual_seed(0)
    torch.set_num_threads(1)
    grid = Grid(4, 64, True)
    layers = []
    for m, n in SHAPES:
        x = torch.randn(8192, n) @ (torch.randn(n, n) * torch.linspace(0.1, 2, n))
        layers.append((torch.randn(m, n) * 0.05, x.T.double() @ x.double()))
    loops = {"previous": None, "float64": torch.float64, "float32": torch.float32}
    times = {name: [] for name in loops}
    codes = {}
    for _ in range(args.repeats):
        for name, dtype in loops.items():
            start = time.perf_counter()
            if dtype is None:
                codes[name] = [previous_loop(w, h, grid).to(torch.int32) for w, h in layers]
            else:
                codes[name] = [gptq_quantize(w, h, grid, dtype=dtype).q for w, h in layers]
            times[name].append(time.perf_counter() - start)
    agree = {name: [float((q == c).double().mean()) for q, c in zip(qs, codes["float64"], strict=True)]
             for name, qs in codes.items()}
    best = {name: min(t) for name, t in times.items()}
    energy = {}
    for name in ("float64", "float32"):
        dtype = loops[name]
        energy[name] = [round(output_energy(w, gptq_quantize(w, h, grid, dtype=dtype).dequantize(), h) / 1e6, 4)
                        for w, h in layers]
    print(f"{'loop':10}{'s / block':>11}  codes equal to this build's float64 loop, per solve")
    for name in loops:
        print(f"{name:10}{best[name]:>11.3f}  {[round(a, 5) for a in agree[name]]}")
    print(f"output error energy / 1e6: float64 {energy['float64']}, float32 {energy['float32']}")
    print(f"this build's default: {best['previous'] / best['float32']:.2f}x faster than the previous loop")
    doc = {"shapes": SHAPES, "grid": "4-bit symmetric, groups of 64", "seconds": times, "best": best,
           "codes_equal_to_float64": agree, "energy_1e6": energy,
           "command": "python benchmarks/gptq_solver.py " + " ".join(sys.argv[1:])}
    (HERE / "results" / "gptq_solver.json").write_text(json.dumps(doc, indent=2) + "\n")


if __name__ == "__main__":
    main()
