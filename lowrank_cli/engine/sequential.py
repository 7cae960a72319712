"""The one sequential block pipeline behind every weight-changing job (decompose, quantize, compress).

One pass over the decoder blocks, one block in memory at a time:

    for each block i:
        load block i from the shards (once, whatever the number of candidates)
        for each candidate (a Modifier with its own activation streams):
            per input group (q/k/v, o, gate/up, down, in forward order): the group's input Gram on the
                candidate's own calibration stream -> modifier.modify(...) changes those layers in place
            carry the candidate's calibration and evaluation streams through its modified block
            hand the block's checkpoint tensors to the candidate's sink
            undo the candidate's changes (the next candidate starts from the original block)
        free block i
    final norm + head on every evaluation stream -> NLL per candidate and evaluation set

Sequential calibration (the default): each group's Gram is measured with every layer before it (earlier
blocks, earlier groups of this block) already changed, as GPTQ's "true sequential" does. That re-measures the
inputs each layer will really see; it does not by itself undo upstream error (no target is adjusted to
compensate). With `true_sequential=False` a block's groups are all measured on the block as it entered (earlier
blocks changed, this one not yet), in one forward.
`sequential=False` measures every Gram on the original model's activations, in the same forward that
carries the calibration stream on.

Several candidates share one read of the model: `compress` runs its whole candidate list in one pass.
A candidate with `track_energy` gets each changed layer's output error energy tr(dW G dW^T) on the Gram it
was solved with in its report (what a second-order loss estimate needs); a `prune(candidate, i)` callback may
stop a candidate after block i (its streams are dropped and it has no NLL: `PipelineOutcome.dropped`).
No file is touched here: tensors go to each candidate's `sink(name, tensor)`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch

from lowrank_cli.engine.activations import Activations
from lowrank_cli.engine.calibration import GramStore, InputGrams, output_energy, run_stored
from lowrank_cli.engine.precision import autocast
from lowrank_cli.engine.targets import Target, by_block
from lowrank_cli.eval.perplexity import NLL

__all__ = ["Modifier", "Unchanged", "Candidate", "PipelineOutcome", "run_pipeline"]

log = logging.getLogger("lowrank")


class Modifier:
    """What a job does to a block's targeted linears. Subclasses override `modify` and, when their
    checkpoint form differs from the block's state dict (factors, packed integers), `tensors`.

    `needs_data`: whether `modify` uses calibration Grams (False for weight-only methods: no calibration
    stream is carried). `product_dtype`: the dtype of the Gram's chunk products (see accumulate_gram).
    """

    needs_data: bool = True
    product_dtype = None

    def modify(self, block, group: list[Target], grams: InputGrams | None) -> list[dict]:
        """Change the group's layers in place (module swaps recorded for `undo`); one report per layer."""
        raise NotImplementedError

    def tensors(self, block, prefix: str) -> Iterator[tuple[str, torch.Tensor]]:
        """The changed block's tensors as the output checkpoint stores them."""
        for key, tensor in block.state_dict().items():
            yield prefix + key, tensor

    def undo(self, block) -> None:
        """Put back modules swapped by `modify` (weights written in place are restored by the pipeline)."""


class Unchanged(Modifier):
    """The original model, carried beside changed ones (its perplexity is the baseline)."""

    needs_data = False

    def modify(self, block, group, grams) -> list[dict]:
        return []


@dataclass
class Candidate:
    """One modifier with its streams: calibration (when it needs data) and one per evaluation set."""

    name: str
    modifier: Modifier
    sink: Callable[[str, torch.Tensor], None] | None = None
    layers: list[dict] = field(default_factory=list)
    seconds: float = 0.0
    calib: Activations | None = None
    evals: dict[str, Activations] = field(default_factory=dict)
    track_energy: bool = False  # add "output_energy" (tr(dW G dW^T), calibration tokens summed) to reports
    dropped_at: int | None = None  # the block after which `prune` stopped it


@dataclass
class PipelineOutcome:
    nll: dict[str, dict[str, NLL]]  # candidate -> evaluation set -> NLL
    layers: dict[str, list[dict]]  # candidate -> per-layer reports
    seconds: dict[str, float]  # candidate -> seconds spent on its blocks (shared reads not counted)
    boundaries: list[Activations] | None = None  # calibration states entering blocks 0..L (keep_boundaries)
    dropped: dict[str, int] = field(default_factory=dict)  # pruned candidate -> the block it stopped after

    def only(self):
        """(NLL per evaluation set, layer reports, seconds) of a single-candidate run."""
        (name,) = self.nll
        return self.nll[name], self.layers[name], self.seconds[name]


def _apply(block, i: int, cand: Candidate, mine: list[Target], shared: InputGrams | None,
           true_sequential: bool = True) -> Activations | None:
    """Run the candidate's modifier on block i; returns its own calibration stream after the block (None
    when the calibration stream is shared: `shared` then holds the original block's Grams)."""
    mod, acts = cand.modifier, cand.calib
    if mine and not mod.needs_data:
        cand.layers += _modify(block, cand, mine, None)
    if not mine or not mod.needs_data or shared is not None:
        if mine and mod.needs_data:
            by_local = {t.local: t for t in mine}
            for group in shared.groups():
                cand.layers += _modify(block, cand, [by_local[g] for g in group], shared)
        return run_stored(block, acts, i, keep=True) if acts is not None else None
    by_local = {t.local: t for t in mine}
    if not true_sequential:
        # every group's Gram in one forward over the block as it entered, then every group changed
        with InputGrams(block, list(by_local), product_dtype=mod.product_dtype) as grams:
            run_stored(block, acts, i, keep=False)
        for group in grams.groups():
            cand.layers += _modify(block, cand, [by_local[g] for g in group], grams)
        del grams
        return run_stored(block, acts, i, keep=True)
    # Learn the input groups and their forward order from one batch, then measure each group's Gram
    # with every layer before it already changed; the forward halts once the group has its input.
    with InputGrams(block, list(by_local)) as probe:
        run_stored(block, acts, i, keep=False, batches=1)
    for group in probe.groups():
        with InputGrams(block, group, halt=True, product_dtype=mod.product_dtype) as grams:
            run_stored(block, acts, i, keep=False)
        cand.layers += _modify(block, cand, [by_local[g] for g in group], grams)
        del grams
    return run_stored(block, acts, i, keep=True)


def _modify(block, cand: Candidate, group: list[Target], grams) -> list[dict]:
    """modifier.modify, plus each changed layer's output error energy when the candidate tracks it (unless the
    modifier measured it already on the same Gram, as GPTQ's report does)."""
    if not cand.track_energy or grams is None:
        return cand.modifier.modify(block, group, grams)
    before = {t.name: block.get_submodule(t.local).weight.detach().clone() for t in group}
    reports = cand.modifier.modify(block, group, grams)
    local = {t.name: t.local for t in group}
    for report in reports:
        name = report.get("name")
        if name in before and "output_energy" not in report:
            after = block.get_submodule(local[name]).weight  # dense product for factors (one matmul)
            report["output_energy"] = output_energy(before[name], after.detach(), grams.gram(local[name]))
    return reports


def _snapshot(block) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in block.state_dict().items()}


def _step(streamed, block, i: int, cand: Candidate, mine: list[Target], shared: InputGrams | None,
          true_sequential: bool) -> None:
    start = time.perf_counter()
    new_c = _apply(block, i, cand, mine, shared, true_sequential)
    if cand.calib is not None:
        cand.calib.release()
        cand.calib = new_c
    for name, acts in cand.evals.items():
        cand.evals[name] = run_stored(block, acts, i, keep=True)
        acts.release()
    if cand.sink is not None:
        for name, tensor in cand.modifier.tensors(block, streamed.block_prefix(i)):
            cand.sink(name, tensor)
    cand.modifier.undo(block)
    cand.seconds += time.perf_counter() - start


def _shared_grams(block, i: int, acts: Activations, mine: list[Target], product_dtype):
    """The original block's Grams of its targets and its outputs, in one forward."""
    if not mine:
        return None, run_stored(block, acts, i, keep=True)
    with InputGrams(block, [t.local for t in mine], product_dtype=product_dtype) as grams:
        out = run_stored(block, acts, i, keep=True)
    return grams, out


def run_pipeline(streamed, calib, evalsets: dict[str, torch.Tensor], targets: list[Target],
                 candidates: list[Candidate], *, sequential: bool = True, true_sequential: bool = True,
                 batch_size: int = 1, keep_boundaries: bool = False, progress=None,
                 calib_autocast: torch.dtype | None = None,
                 prune: Callable[[Candidate, int], bool] | None = None,
                 gram_store: GramStore | None = None) -> PipelineOutcome:
    """Run every candidate over the model in one streamed pass; see the module docstring.

    `calib`: [n, seq] calibration token windows; `evalsets`: name -> [n, seq] windows whose NLL each
    candidate reports. With `sequential=False` one calibration stream through the original blocks serves
    every candidate (its Grams are measured once per block). `true_sequential=False` (with `sequential`)
    measures all of a block's Grams in one forward over the candidate's stream as it enters the block, instead
    of one halted forward per input group after the groups before it are changed: two block forwards per
    block instead of about three (llm-compressor's sequential pipeline; gptqmodel's `true_sequential=False`).
    `keep_boundaries` keeps a calibration stream at every block boundary (the shared one, else the first
    candidate's; the Fisher sensitivity pass replays them). `prune(candidate, i)`, asked after each block,
    stops a candidate for good when it answers True (see the module docstring). `calib_autocast`: run the
    shared calibration forward (`sequential=False` only) under torch.autocast in this dtype, for passes whose
    Grams and boundaries only steer (the profile); the evaluation streams always run in the compute dtype.
    `gram_store` (`sequential=False` only): a store holding every block's Grams, measured with this pass's
    products, supplies them, and no calibration stream is carried; any other store is filled with this pass's
    Grams (as far as its limit allows), unless the calibration forward runs under autocast. The streamed model
    is left as it was found.
    """
    if prune is not None and keep_boundaries:
        raise ValueError("keep_boundaries follows the first candidate, which prune could stop")
    needs_data = any(c.modifier.needs_data for c in candidates)
    # float64 products unless every candidate accepts lower precision
    product_dtype = {c.modifier.product_dtype for c in candidates if c.modifier.needs_data}
    product_dtype = product_dtype.pop() if len(product_dtype) == 1 else None
    stored, fill = _store_use(gram_store, sequential, needs_data, product_dtype, calib_autocast, keep_boundaries,
                              streamed.num_blocks)
    capture_c = (needs_data and not stored) or keep_boundaries
    captured_c = streamed.capture(calib, batch_size) if capture_c else None
    captured_e = {name: streamed.capture(w, batch_size) for name, w in evalsets.items()}
    shared_c = captured_c if not sequential and capture_c else None
    for k, cand in enumerate(candidates):
        own = sequential and (cand.modifier.needs_data or (keep_boundaries and k == 0))
        cand.calib = _copy(captured_c) if own else None
        cand.evals = {name: _copy(acts) for name, acts in captured_e.items()}
    first = shared_c if shared_c is not None else candidates[0].calib
    boundaries = [_copy(first)] if keep_boundaries else None
    targets_of = by_block(targets)
    for i in range(streamed.num_blocks):
        t0 = time.perf_counter()
        block = streamed.load_block(i)
        mine = targets_of.get(i, [])
        grams = None
        if stored:
            grams = gram_store.get(i, streamed.device)
        elif shared_c is not None:
            with autocast(streamed.device, calib_autocast):
                grams, new_shared = _shared_grams(block, i, shared_c, mine if needs_data else [], product_dtype)
            if fill:
                gram_store.put(i, grams)
        live = [c for c in candidates if c.dropped_at is None]
        original = _snapshot(block) if len(live) > 1 else None
        if grams is not None and len(live) > 1:
            grams.memo = {}  # shared by every candidate: what one derives from it the next can reuse
        for k, cand in enumerate(live):
            if k:
                block.load_state_dict(original)
            _step(streamed, block, i, cand, mine, grams, true_sequential)
            if prune is not None and prune(cand, i):
                _drop(cand, i)
        del grams
        if shared_c is not None:
            shared_c.release()
            shared_c = new_shared
        if keep_boundaries:
            boundaries.append(_copy(shared_c if shared_c is not None else candidates[0].calib))
        streamed.free_block(i)
        log.debug("block %d/%d done in %.1fs", i + 1, streamed.num_blocks, time.perf_counter() - t0)
        if progress:
            progress()
        if all(c.dropped_at is not None for c in candidates):
            break  # every candidate pruned: the rest of the model would be read for nothing
    if fill and gram_store.complete(streamed.num_blocks):
        log.info("kept the Grams of %d blocks (%.0f MiB) for later passes", streamed.num_blocks,
                 gram_store.nbytes / 2**20)
    nll = {}
    for cand in (c for c in candidates if c.dropped_at is None):
        nll[cand.name] = {name: _nll(streamed.head_nll_rows(acts, evalsets[name], batch_size), evalsets[name])
                          for name, acts in cand.evals.items()}
        _release_streams(cand)
    for acts in [captured_c, shared_c, *captured_e.values()]:
        if acts is not None:
            acts.release()
    return PipelineOutcome(nll, {c.name: c.layers for c in candidates},
                           {c.name: round(c.seconds, 3) for c in candidates}, boundaries,
                           {c.name: c.dropped_at for c in candidates if c.dropped_at is not None})


def _store_use(store: GramStore | None, sequential: bool, needs_data: bool, product_dtype, calib_autocast,
               keep_boundaries: bool, num_blocks: int) -> tuple[bool, bool]:
    """(take the Grams from the store, fill the store) for this pass."""
    if store is None or sequential or not needs_data or store.product_dtype != product_dtype:
        return False, False
    if store.complete(num_blocks):
        return not keep_boundaries, False
    return False, calib_autocast is None and not store.overflowed


def _release_streams(cand: Candidate) -> None:
    for acts in [*cand.evals.values(), cand.calib]:
        if acts is not None:
            acts.release()
    cand.evals, cand.calib = {}, None


def _drop(cand: Candidate, i: int) -> None:
    """Stop a pruned candidate: its streams go, its reports so far stay."""
    cand.dropped_at = i
    _release_streams(cand)
    log.info("%s pruned after block %d", cand.name, i)


def _nll(rows: list[float], windows) -> NLL:
    """Totals and each window's sum (the noise of a comparison is computed from the rows)."""
    import math

    return NLL(math.fsum(rows), int(windows[:, 1:].numel()), rows)


def _copy(acts: Activations | None) -> Activations | None:
    """A stream of its own over the same tensors: run_stored never writes into its inputs, so the
    tensors are shared, not copied, until a block produces new ones."""
    if acts is None:
        return None
    other = acts.new_like()
    for tensor in acts:
        other.append(tensor)
    return other
