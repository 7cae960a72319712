"""Decompose's modifiers for the sequential pipeline (`lowrank_cli.engine.sequential`).

- `Profiler` changes nothing: it records each target's error-versus-rank curve (from its input Gram, or
  the weight alone for `svd`), which rank allocation consumes.
- `Factorize` swaps each target with a rank given for it for a `LowRankLinear` holding the factors that
  minimise the output error on the Gram it is handed (the data-aware optimum), or the plain SVD.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from lowrank_cli.engine.sequential import Modifier
from lowrank_cli.engine.targets import Target
from lowrank_cli.methods.decompose.factorize import (
    Spectrum,
    data_spectrum,
    factors_from_spectrum,
    weight_spectrum,
)

__all__ = ["CURVE_PRODUCTS", "Profiler", "Factorize", "layer_spectrum", "swap_in_factors", "factorized_tensors"]


def layer_spectrum(weight: torch.Tensor, grams, local: str, method: str, damp: float,
                   vectors: bool = True) -> Spectrum:
    if method == "svd" or grams is None:
        return weight_spectrum(weight)
    return data_spectrum(weight, grams.gram(local), damp, vectors=vectors)


# The profile's Grams feed only the error-versus-rank curves the allocation reads, never a written factor
# (those come from the compress pass's own Grams, whose products `--gram-products` sets). float32 chunk
# products (still summed in float64) measured the same allocation as float64 ones on SmolLM2: identical ranks
# at kept fractions 0.6, 0.8, 0.9 and 0.98, the curves' tails at most 2.7e-4 apart (relative), against a ~30%
# window-to-window noise in the Fisher weights that multiply them. So they are float32 whatever
# `--gram-products` says: that option keeps its meaning (the precision of the factors), and a float64 profile
# would only cost time.
CURVE_PRODUCTS = torch.float32


class Profiler(Modifier):
    """Each target's output error at every rank, relative and absolute; nothing is changed."""

    def __init__(self, method: str, damp: float, curves: bool = True, product_dtype=CURVE_PRODUCTS):
        self.method, self.damp, self.curves, self.product_dtype = method, damp, curves, product_dtype
        self.needs_data = curves and method != "svd"
        self.tails: dict[str, torch.Tensor] = {}
        self.relative: dict[str, torch.Tensor] = {}

    def modify(self, block, group: list[Target], grams) -> list[dict]:
        for t in group:
            if not self.curves:  # uniform or fixed ranks need no curve: a zero placeholder
                self.tails[t.name] = torch.zeros(min(t.m, t.n) + 1, dtype=torch.float64)
                self.relative[t.name] = self.tails[t.name]
                continue
            # the curve needs the energies only, not the directions (those come when the layer is factorized)
            spec = layer_spectrum(block.get_submodule(t.local).weight.detach(), grams, t.local, self.method,
                                  self.damp, vectors=False)
            self.tails[t.name] = spec.tails()
            self.relative[t.name] = self.tails[t.name] / max(spec.total, 1e-300)
        return []

    def tensors(self, block, prefix: str):
        return iter(())


def swap_in_factors(block, t: Target, up: torch.Tensor, down: torch.Tensor, restore: list) -> None:
    """Replace the linear `t.local` of `block` by a LowRankLinear(up, down) (original pushed on restore)."""
    from lowrank_cli.modeling.lowrank_modeling import LowRankLinear

    original = block.get_submodule(t.local)
    rank = up.shape[1]
    lr = LowRankLinear(t.n, t.m, rank, bias=t.bias, device=original.weight.device, dtype=original.weight.dtype)
    with torch.no_grad():
        lr.up.weight.copy_(up)
        lr.down.weight.copy_(down)
        if t.bias:
            lr.up.bias.copy_(original.bias)
    parent_name, _, attr = t.local.rpartition(".")
    parent = block.get_submodule(parent_name) if parent_name else block
    setattr(parent, attr, lr)
    restore.append((parent, attr, original))


def factorized_tensors(block, prefix: str, dense: bool) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) of a (possibly factorized) block, as the output checkpoint stores them; `dense`
    multiplies the factors back."""
    from lowrank_cli.modeling.export import dense_weight
    from lowrank_cli.modeling.lowrank_modeling import LowRankLinear

    lowrank = {name: mod for name, mod in block.named_modules() if isinstance(mod, LowRankLinear)}
    for key, tensor in block.state_dict().items():
        owner = next((n for n in lowrank if key.startswith(n + ".")), None)
        if owner is None or not dense:
            yield prefix + key, tensor
        elif key == owner + ".up.weight":
            mod = lowrank[owner]
            yield prefix + owner + ".weight", dense_weight(mod.up.weight, mod.down.weight)
            if mod.up.bias is not None:
                yield prefix + owner + ".bias", mod.up.bias


class Factorize(Modifier):
    """Targets with a rank in `ranks` become LowRankLinear factors; the others stay as they are."""

    def __init__(self, ranks: dict[str, int], method: str, damp: float, dense: bool = False, product_dtype=None):
        self.ranks, self.method, self.damp, self.dense = ranks, method, damp, dense
        self.product_dtype = product_dtype  # None: float64 Gram products (see accumulate_gram)
        self.needs_data = method != "svd"
        self._restore: list = []

    def factorize(self, block, t: Target, grams) -> dict:
        weight = block.get_submodule(t.local).weight.detach()

        def spectrum():
            return layer_spectrum(weight, grams, t.local, self.method, self.damp)

        # candidates sharing the original block's Grams share its spectra (same weight, same Gram)
        spec = grams.derived(("spectrum", t.local, self.method, self.damp), spectrum) if grams is not None \
            else spectrum()
        rank = self.ranks[t.name]
        up, down = factors_from_spectrum(weight, spec, rank)
        swap_in_factors(block, t, up, down, self._restore)
        return {"name": t.name, "shape": [t.m, t.n], "rank": rank, "params_before": t.params,
                "params_after": rank * (t.m + t.n), "relative_error": spec.tail(rank) / max(spec.total, 1e-300)}

    def modify(self, block, group: list[Target], grams) -> list[dict]:
        return [self.factorize(block, t, grams) for t in group if self.ranks.get(t.name) is not None]

    def tensors(self, block, prefix: str):
        return factorized_tensors(block, prefix, self.dense)

    def undo(self, block) -> None:
        for parent, attr, original in reversed(self._restore):
            setattr(parent, attr, original)
        self._restore = []
