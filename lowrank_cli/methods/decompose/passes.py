"""Streaming passes of `decompose` over a `StreamedModel`, one decoder block in memory at a time.

- `profile_pass`: the original model over calibration and evaluation windows. Per target: its
  error-versus-rank curve (from the input Gram, or the weight alone for `svd`); the baseline evaluation
  NLL; optionally the hidden states at every block boundary (for the sensitivity pass).
- `compress_pass`: factorize each block at given ranks and carry calibration and evaluation windows
  through the compressed blocks, so one pass yields both the compressed weights (handed to `sink`) and
  the compressed model's evaluation NLL.

Sequential calibration (the default): a block's Grams are measured on the outputs of the already
compressed blocks before it, and inside a block one input group at a time (q/k/v, then o, then gate/up,
then down), each on the outputs of the already factorized layers before it. So every factorization
corrects for the error upstream of it, as GPTQ does. `sequential=False` measures every Gram on the
original model's activations instead.

No file is touched here: tensors go to `sink(name, tensor)`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from lowrank_cli.engine.activations import Activations
from lowrank_cli.engine.calibration import InputGrams
from lowrank_cli.engine.calibration import run_stored as _run
from lowrank_cli.eval.perplexity import NLL
from lowrank_cli.methods.decompose.factorize import (
    Spectrum,
    data_spectrum,
    factors_from_spectrum,
    weight_spectrum,
)
from lowrank_cli.methods.decompose.targets import Target, by_block

__all__ = ["Profile", "PassOutcome", "profile_pass", "compress_pass", "InputGrams"]

log = logging.getLogger("lowrank")


# -- profile ------------------------------------------------------------------------------------------------
@dataclass
class Profile:
    tails: dict[str, torch.Tensor]  # per target: output error energy at each rank (length k+1)
    relative: dict[str, torch.Tensor]  # the same, divided by the total
    baseline: NLL
    boundaries: list[Activations] | None  # calibration hidden states entering block 0..L (L = after last)
    seconds: float = 0.0


def profile_pass(streamed, calib, evalw, targets: list[Target], *, method: str, damp: float,
                 batch_size: int, keep_boundaries: bool, curves: bool = True, progress=None) -> Profile:
    """`curves=False` skips the Grams and spectra (uniform or fixed ranks need none): baseline only."""
    start = time.perf_counter()
    if not curves and not keep_boundaries:
        calib = calib[:0]
    acts_c = streamed.capture(calib, batch_size)
    acts_e = streamed.capture(evalw, batch_size)
    boundaries = [acts_c] if keep_boundaries else None
    targets_of = by_block(targets)
    tails, relative = {}, {}
    for i in range(streamed.num_blocks):
        block = streamed.load_block(i)
        mine = targets_of.get(i, []) if curves else []
        with InputGrams(block, [t.local for t in mine if method != "svd"]) as grams:
            new_c = _run(block, acts_c, i, keep=True)
        for t in mine:
            weight = block.get_submodule(t.local).weight.detach()
            spec = weight_spectrum(weight) if method == "svd" else data_spectrum(weight, grams.gram(t.local),
                                                                                  damp)
            tails[t.name] = spec.tails()
            relative[t.name] = tails[t.name] / max(spec.total, 1e-300)
        del grams
        if not curves:
            for t in targets_of.get(i, []):
                tails[t.name] = torch.zeros(min(t.m, t.n) + 1, dtype=torch.float64)
                relative[t.name] = tails[t.name]
        new_e = _run(block, acts_e, i, keep=True)
        streamed.free_block(i)
        if not keep_boundaries:
            acts_c.release()
        acts_e.release()
        acts_c, acts_e = new_c, new_e
        if keep_boundaries:
            boundaries.append(acts_c)
        log.debug("profile: block %d/%d done after %.1fs", i + 1, streamed.num_blocks,
                  time.perf_counter() - start)
        if progress:
            progress()
    baseline = NLL(*streamed.head_nll(acts_e, evalw, batch_size))
    acts_e.release()
    if not keep_boundaries:
        acts_c.release()
    return Profile(tails, relative, baseline, boundaries, time.perf_counter() - start)


# -- compress -----------------------------------------------------------------------------------------------
@dataclass
class PassOutcome:
    nll: NLL
    layers: list[dict] = field(default_factory=list)
    seconds: float = 0.0


def _replace(block, t: Target, spec: Spectrum, rank: int, restore: list) -> dict:
    from lowrank_cli.modeling.lowrank_modeling import LowRankLinear

    original = block.get_submodule(t.local)
    up, down = factors_from_spectrum(original.weight.detach(), spec, rank)
    lr = LowRankLinear(t.n, t.m, rank, bias=t.bias, device=original.weight.device,
                       dtype=original.weight.dtype)
    with torch.no_grad():
        lr.up.weight.copy_(up)
        lr.down.weight.copy_(down)
        if t.bias:
            lr.up.bias.copy_(original.bias)
    parent_name, _, attr = t.local.rpartition(".")
    parent = block.get_submodule(parent_name) if parent_name else block
    setattr(parent, attr, lr)
    restore.append((parent, attr, original))
    rel = spec.tail(rank) / max(spec.total, 1e-300)
    return {"name": t.name, "shape": [t.m, t.n], "rank": rank, "params_before": t.params,
            "params_after": rank * (t.m + t.n), "relative_error": rel}


def compress_block(block, i: int, acts: Activations, mine: list[Target], ranks: dict, *, method: str,
                   damp: float, sequential: bool, restore: list) -> list[dict]:
    """Factorize block i's targets in place (originals pushed on `restore`); per-layer reports."""
    todo = [t for t in mine if ranks.get(t.name) is not None]
    reports = []
    if method == "svd":
        for t in todo:
            spec = weight_spectrum(block.get_submodule(t.local).weight.detach())
            reports.append(_replace(block, t, spec, ranks[t.name], restore))
        return reports
    by_local = {t.local: t for t in todo}
    if not todo:
        return reports
    if not sequential:
        with InputGrams(block, list(by_local)) as grams:
            _run(block, acts, i, keep=False)
        for t in todo:
            spec = data_spectrum(block.get_submodule(t.local).weight.detach(), grams.gram(t.local), damp)
            reports.append(_replace(block, t, spec, ranks[t.name], restore))
        return reports
    # Learn the input groups and their forward order from one batch, then measure each group's Gram
    # with every layer before it already factorized.
    with InputGrams(block, list(by_local)) as probe:
        _run(block, acts, i, keep=False, batches=1)
    for group in probe.groups():
        with InputGrams(block, group, halt=True) as grams:
            _run(block, acts, i, keep=False)
        for local in group:
            t = by_local[local]
            spec = data_spectrum(block.get_submodule(local).weight.detach(), grams.gram(local), damp)
            reports.append(_replace(block, t, spec, ranks[t.name], restore))
        del grams
    return reports


def block_tensors(block, prefix: str, dense: bool):
    """(name, tensor) of a (possibly factorized) block, as the output checkpoint stores them."""
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


def compress_pass(streamed, calib, evalw, targets: list[Target], ranks: dict, *, method: str, damp: float,
                  sequential: bool, batch_size: int, dense: bool = False,
                  sink: Callable | None = None, progress=None) -> PassOutcome:
    start = time.perf_counter()
    need_calib = method != "svd"
    acts_c = streamed.capture(calib, batch_size) if need_calib else None
    acts_e = streamed.capture(evalw, batch_size)
    targets_of = by_block(targets)
    reports: list[dict] = []
    for i in range(streamed.num_blocks):
        t0 = time.perf_counter()
        block = streamed.load_block(i)
        restore: list = []
        if need_calib and not sequential:
            original_out = _run(block, acts_c, i, keep=True)
        layer_reports = compress_block(block, i, acts_c, targets_of.get(i, []), ranks, method=method,
                                       damp=damp, sequential=sequential, restore=restore)
        if need_calib:
            new_c = original_out if not sequential else _run(block, acts_c, i, keep=True)
            acts_c.release()
            acts_c = new_c
        new_e = _run(block, acts_e, i, keep=True)
        acts_e.release()
        acts_e = new_e
        if sink is not None:
            for name, tensor in block_tensors(block, streamed.block_prefix(i), dense):
                sink(name, tensor)
        for parent, attr, original in reversed(restore):
            setattr(parent, attr, original)
        streamed.free_block(i)
        for rep in layer_reports:
            log.debug("block %d %s rank %d rel.err %.4f", i, rep["name"], rep["rank"],
                      rep["relative_error"])
        reports.extend(layer_reports)
        log.debug("block %d/%d done in %.1fs", i + 1, streamed.num_blocks, time.perf_counter() - t0)
        if progress:
            progress()
    nll = NLL(*streamed.head_nll(acts_e, evalw, batch_size))
    acts_e.release()
    if acts_c is not None:
        acts_c.release()
    return PassOutcome(nll, reports, time.perf_counter() - start)
