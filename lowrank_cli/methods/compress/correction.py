"""GPTQ plus a low-rank correction of its error, W ~ Q + L R (the idea of LQER and CALDERA).

Per layer, on the calibration Gram G = X^T X: Q = GPTQ(W), then L R = the rank-r factors of the residual
E = W - Q that minimise ||(E - L R) X|| (the data-aware optimum decompose uses: top eigenvectors of
E G E^T). The model downstream (later groups and blocks, the eval text) runs on Q + L R, with L and R
rounded to float16 as they are stored. Q goes to the checkpoint in GPTQ format; L R becomes a standard PEFT
LoRA adapter (lora_B = L, lora_A = R, scaling 1) in the `correction/` subfolder, so the result loads with no
remote code and QLoRA-style healing can train that adapter directly.
"""

from __future__ import annotations

import torch

from lowrank_cli.engine.sequential import Modifier
from lowrank_cli.engine.targets import Target
from lowrank_cli.methods.decompose.factorize import data_spectrum, factors_from_spectrum
from lowrank_cli.methods.quantize.gptq import output_errors
from lowrank_cli.methods.quantize.modifier import Quantize, packed_tensors

__all__ = ["QuantizeWithCorrection", "residual_factors", "CORRECTION_DIR"]

CORRECTION_DIR = "correction"


def residual_factors(weight: torch.Tensor, approx: torch.Tensor, gram: torch.Tensor, rank: int,
                     damp: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(L, R), float64, L m x r and R r x n: the rank-r L R minimising ||(W - approx - L R) X||_F."""
    residual = weight.detach().double() - approx.detach().double()
    rank = min(rank, *residual.shape)
    return factors_from_spectrum(residual, data_spectrum(residual, gram, damp), rank)


class QuantizeWithCorrection(Modifier):
    """GPTQ each target, then correct it with a rank-r L R; L R is kept for the adapter."""

    product_dtype = None  # float64 Gram products: the correction lives in the small directions

    def __init__(self, quantize: Quantize, rank: int, *, damp: float = 0.01, store_dtype=torch.float16):
        self.quantize, self.rank, self.damp, self.store_dtype = quantize, rank, damp, store_dtype
        self.factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def correct(self, module, t: Target, gram: torch.Tensor) -> dict:
        weight = module.weight.detach().clone()
        report = self.quantize.quantize(module, t.local, gram)  # module.weight is now Q, dequantized
        q = module.weight.detach()
        up, down = residual_factors(weight, q, gram, self.rank, self.damp)
        up, down = up.to(self.store_dtype), down.to(self.store_dtype)
        corrected = q.double() + up.double() @ down.double()
        report["output_error_corrected"] = output_errors(weight, [corrected], gram)[0]
        with torch.no_grad():
            module.weight.copy_(corrected.to(module.weight.dtype))
        self.factors[t.name] = (up.cpu(), down.cpu())
        return {"name": t.name, "correction_rank": up.shape[1], **report}

    def modify(self, block, group: list[Target], grams) -> list[dict]:
        return [self.correct(block.get_submodule(t.local), t, grams.gram(t.local)) for t in group]

    def tensors(self, block, prefix: str):
        return packed_tensors(block, prefix, self.quantize.packed)

    def undo(self, block) -> None:
        self.quantize.undo(block)

    def write_adapter(self, folder, model_type: str | None = None) -> None:
        from pathlib import Path

        from lowrank_cli.io.lora_adapter import write_lora_adapter

        write_lora_adapter(Path(folder) / CORRECTION_DIR, self.factors, base_name_or_path="..")
