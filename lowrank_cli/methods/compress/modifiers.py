"""Factorize, then quantize both factors, in one step per input group of the sequential pipeline.

The factors' Hessians follow from the dense layer's input Gram G = X^T X, with no further pass over
the data: `down` (r x n) reads X itself, so its Hessian is G; `up` (m x r) reads down_q X, so its Hessian is
down_q G down_q^T, computed from the *quantized* down so that up's GPTQ corrects down's rounding too.
"""

from __future__ import annotations

import torch

from lowrank_cli.engine.sequential import Modifier
from lowrank_cli.engine.targets import Target
from lowrank_cli.methods.decompose.modifier import Factorize
from lowrank_cli.methods.quantize.modifier import Quantize, packed_tensors

__all__ = ["FactorizeThenQuantize", "factor_hessian"]


def factor_hessian(down: torch.Tensor, gram: torch.Tensor) -> torch.Tensor:
    """The input Gram of `up`: D G D^T (float64), for `down` = D (r x n) and the layer input Gram G."""
    d = down.detach().to(device=gram.device, dtype=torch.float64)
    h = d @ gram @ d.T
    return 0.5 * (h + h.T)


class FactorizeThenQuantize(Modifier):
    """Targets with a rank are factorized (data-aware) and both factors quantized; the others are quantized
    as they are. The checkpoint stores packed `NAME.up` / `NAME.down` linears (a factorized GPTQ model)."""

    # float32 chunk products, as decompose's default: they measured the same factorized models as float64 ones
    # (the Gram decides the factors' directions; see DecomposeOptions.gram_products)
    product_dtype = torch.float32

    def __init__(self, factorize: Factorize, quantize: Quantize):
        self.factorize, self.quantize = factorize, quantize

    def modify(self, block, group: list[Target], grams) -> list[dict]:
        reports = []
        for t in group:
            gram = grams.gram(t.local)
            if self.factorize.ranks.get(t.name) is None:
                reports.append({"name": t.name, **self.quantize.quantize(block.get_submodule(t.local), t.local,
                                                                         gram)})
                continue
            report = self.factorize.factorize(block, t, grams)
            pair = block.get_submodule(t.local)
            down = self.quantize.quantize(pair.down, t.local + ".down", gram)
            up = self.quantize.quantize(pair.up, t.local + ".up", factor_hessian(pair.down.weight, gram))
            report.update(down_output_error=down.get("output_error"), up_output_error=up.get("output_error"))
            reports.append(report)
        return reports

    def tensors(self, block, prefix: str):
        return packed_tensors(block, prefix, self.quantize.packed)

    def undo(self, block) -> None:
        self.factorize.undo(block)
        self.quantize.undo(block)
