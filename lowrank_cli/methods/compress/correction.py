"""GPTQ plus a low-rank correction of its error, W ~ Q + L R, as a modifier of the sequential pipeline.

The math (GPTQ, then the data-aware rank-r optimum of the residual under the calibration Gram, alternated
and the best round kept) is `methods/quantize/lowrank_correction.py`. Here: the model downstream (later
groups and blocks, the eval text) runs on Q + L R with L and R rounded as they are stored; Q goes to the
checkpoint in GPTQ format, and `factors` (L, R per layer) become a standard PEFT LoRA adapter (lora_B = L,
lora_A = R, scaling 1) that the caller writes beside it, so the result loads with no remote code and healing
can train that adapter.
"""

from __future__ import annotations

import torch

from lowrank_cli.engine.sequential import Modifier
from lowrank_cli.engine.targets import Target
from lowrank_cli.methods.quantize.lowrank_correction import gptq_quantizer, lowrank_correct
from lowrank_cli.methods.quantize.modifier import Quantize, packed_tensors
from lowrank_cli.methods.quantize.packing import pack

__all__ = ["QuantizeWithCorrection"]


ROUNDS = 2  # alternations after plain GPTQ (each scored; the best is kept)


class QuantizeWithCorrection(Modifier):
    """GPTQ each target together with a rank-r correction L R; L R is kept for the adapter."""

    product_dtype = None  # float64 Gram products: the correction lives in the small directions

    def __init__(self, quantize: Quantize, rank: int, *, damp: float = 0.01, store_dtype=torch.float16):
        self.quantize, self.rank, self.damp, self.store_dtype = quantize, rank, damp, store_dtype
        self.quantizer = gptq_quantizer(quantize.grid, damp=quantize.damp, act_order=quantize.act_order)
        self.factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def correct(self, module, t: Target, gram: torch.Tensor) -> dict:
        weight = module.weight.detach()
        rank = min(self.rank, t.m, t.n)
        best = lowrank_correct(weight, gram, self.quantizer, rank, iterations=ROUNDS, damp=self.damp)
        up, down = best.up.to(self.store_dtype), best.down.to(self.store_dtype)
        self.quantize.packed[t.local] = pack(best.quantized)
        with torch.no_grad():  # downstream sees exactly what the checkpoint + adapter compute
            module.weight.copy_((best.dequantized + up.double() @ down.double()).to(module.weight.dtype))
        self.factors[t.name] = (up.cpu(), down.cpu())
        return {"name": t.name, "correction_rank": rank, "output_error": best.history[0] if rank == 0 else None,
                "output_error_corrected": best.error, "rounds": best.history, "best_round": best.best_round}

    def modify(self, block, group: list[Target], grams) -> list[dict]:
        return [self.correct(block.get_submodule(t.local), t, grams.gram(t.local)) for t in group]

    def tensors(self, block, prefix: str):
        return packed_tensors(block, prefix, self.quantize.packed)

    def undo(self, block) -> None:
        self.quantize.undo(block)
