"""Calibration inputs of a block's linears, shared by every method that solves per layer (decompose, quantize).

`InputGrams` hooks linears of one block and accumulates one float64 Gram X^T X per distinct input tensor;
`run_stored` runs a block over stored activations with the block's recorded call arguments.
"""

from __future__ import annotations

import collections

import torch
from torch import Tensor

from lowrank_cli.engine.activations import Activations

__all__ = ["InputGrams", "MeasuredGrams", "GramStore", "run_stored", "accumulate_gram", "output_energy"]

# Tokens cast to float64 per step in `accumulate_gram`: bounds the float64 copy of a large
# activation batch (tokens x n x 8 bytes) while keeping each matmul big enough to run at full speed.
_GRAM_CHUNK_ROWS = 8192
# Tokens per lower-precision product (see `product_dtype`): short sums keep its rounding error small.
_LOW_PRECISION_CHUNK_ROWS = 1024


def accumulate_gram(gram: Tensor | None, x: Tensor, product_dtype=None) -> Tensor:
    """Add the input Gram x^T x of one batch of activations to a running float64 Gram.

    Args:
        gram: The running n x n float64 Gram, or None to start one. It is updated in place (the
            Gram of a wide MLP input is ~1 GB in float64, so no copy is made) and returned.
        x: Activations of shape (..., n) in any float dtype; every leading index is one token.
        product_dtype: dtype of each chunk's product X_c^T X_c before it is added to the float64 sum;
            float64 by default (exact enough for the smallest directions that decide a low-rank tail).
            GPTQ passes float32: its Hessian is damped by 1% of the mean diagonal, far above float32
            rounding, and float32 products run about twice as fast on CPU.

    Returns:
        The n x n float64 Gram, on x's device when it was created here, otherwise on gram's device.

    Raises:
        ValueError: If x is not floating point or does not match the Gram's size.
    """
    if not x.is_floating_point() or x.ndim < 1:
        raise ValueError(f"activations must be a float tensor (..., n), got {x.dtype} {x.ndim}-D")
    n = x.shape[-1]
    rows = x.reshape(-1, n)
    if gram is None:
        gram = torch.zeros(n, n, dtype=torch.float64, device=x.device)
    elif gram.shape != (n, n) or gram.dtype != torch.float64:
        raise ValueError(f"Gram must be float64 {n} x {n}, got {gram.dtype} {tuple(gram.shape)}")
    if product_dtype in (None, torch.float64):
        for start in range(0, rows.shape[0], _GRAM_CHUNK_ROWS):
            # Cast before the product: half-precision sums of thousands of squared activations overflow
            # or lose the small directions that decide the high-rank error.
            chunk = rows[start : start + _GRAM_CHUNK_ROWS].to(device=gram.device, dtype=torch.float64)
            gram.addmm_(chunk.T, chunk)
        return gram
    for start in range(0, rows.shape[0], _LOW_PRECISION_CHUNK_ROWS):
        chunk = rows[start : start + _LOW_PRECISION_CHUNK_ROWS].to(device=gram.device, dtype=product_dtype)
        gram += (chunk.T @ chunk).to(torch.float64)
    return gram


def output_energy(weight: Tensor, changed: Tensor, gram: Tensor) -> float:
    """tr(D G D^T) with D = weight - changed and G = X^T X: the summed squared output error over the Gram's
    tokens (any scale of G scales it alike). A report, not part of a solve: float32 products (one m x n x n
    GEMM) are plenty for three significant digits."""
    d = (weight.double() - changed.double()).float()
    return float(((d @ gram.to(device=d.device, dtype=torch.float32)) * d).sum())


class _Halt(Exception):
    """Raised by a hook once the block has computed everything a Gram needs."""


class InputGrams:
    """Forward pre-hooks on some linears of one block: one float64 Gram per distinct input tensor.

    Linears fed the very same tensor (q/k/v, gate/up) share one Gram: the hook compares tensor objects, so
    no architecture table is needed. `order` lists the groups in the order the forward reaches them.
    With `halt=True` the forward stops as soon as every hooked layer has seen its input (the rest of
    the block would be wasted work).
    """

    def __init__(self, block, locals_: list[str], halt: bool = False, product_dtype=None):
        self.block, self.locals, self.halt = block, list(locals_), halt
        self.product_dtype = product_dtype
        self.grams: dict[str, torch.Tensor] = {}
        self.memo: dict | None = None  # results several candidates derive alike from these Grams (see `derived`)
        self.group_of: dict[str, str] = {}
        self.order: list[str] = []
        self.tokens = 0
        self._recent: collections.deque = collections.deque(maxlen=4)
        self._seen: set[str] = set()
        self._handles = []

    def __enter__(self):
        for local in self.locals:
            module = self.block.get_submodule(local)
            self._handles.append(module.register_forward_pre_hook(self._hook(local)))
        return self

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()
        self._recent.clear()

    def _hook(self, local: str):
        def hook(module, inputs):
            x = inputs[0]
            key = next((k for obj, k in self._recent if obj is x), None)
            if key is None:
                key = self.group_of.get(local, local)
                self.grams[key] = accumulate_gram(self.grams.get(key), x.detach(), self.product_dtype)
                if key == local and key not in self.order:
                    self.order.append(key)
                self._recent.append((x, key))
                if key == self.order[0]:
                    self.tokens += x.numel() // x.shape[-1]
            self.group_of.setdefault(local, key)
            self._seen.add(local)
            if self.halt and len(self._seen) == len(self.locals):
                self._seen.clear()
                raise _Halt

        return hook

    def groups(self) -> list[list[str]]:
        return [[loc for loc in self.locals if self.group_of.get(loc) == key] for key in self.order]

    def gram(self, local: str) -> torch.Tensor:
        return self.grams[self.group_of[local]]

    def derived(self, key, compute):
        """compute(), or the value a candidate before this one computed under `key` when the pipeline shares
        these Grams among candidates (`memo` set): they all start from the original block, so a value derived
        from a layer's original weight and its Gram (a layer's spectrum) is the same for each."""
        if self.memo is None:
            return compute()
        if key not in self.memo:
            self.memo[key] = compute()
        return self.memo[key]

    def measured(self, device=None) -> MeasuredGrams:
        """What was measured, without the hooks and the block (which a kept InputGrams would keep alive)."""
        grams = {k: g.to(device) if device is not None else g for k, g in self.grams.items()}
        return MeasuredGrams(list(self.locals), grams, dict(self.group_of), list(self.order))


class MeasuredGrams:
    """A block's Grams as `InputGrams` measured them (the same `groups` and `gram`), kept after the forward."""

    def __init__(self, locals_: list[str], grams: dict[str, Tensor], group_of: dict[str, str], order: list[str]):
        self.locals, self.grams, self.group_of, self.order = locals_, grams, group_of, order
        self.memo: dict | None = None

    groups = InputGrams.groups
    gram = InputGrams.gram
    derived = InputGrams.derived

    def nbytes(self) -> int:
        return sum(g.numel() * g.element_size() for g in self.grams.values())

    def to(self, device) -> MeasuredGrams:
        return MeasuredGrams(self.locals, {k: g.to(device) for k, g in self.grams.items()}, self.group_of, self.order)


class GramStore:
    """The original model's Grams of every block, kept from one non-sequential pass for the next ones.

    decompose measures these Grams in its profile pass and again in every compress pass (they do not change:
    the same original activations, the same products); kept, a later pass carries no calibration stream at all.
    They are kept in host memory only while they fit `limit_bytes` (the float64 Grams of a large model are
    many GB per block): past it the store empties itself and the later passes measure them again.
    """

    def __init__(self, limit_bytes: int, product_dtype=None):
        self.limit_bytes, self.product_dtype = int(limit_bytes), product_dtype
        self.blocks: dict[int, MeasuredGrams] = {}
        self.overflowed = False
        self.nbytes = 0

    def put(self, i: int, grams: InputGrams | None) -> None:
        """Keep block i's Grams (None: a block without targets)."""
        if self.overflowed:
            return
        # host memory: a GPU run keeps the device free for its block
        kept = grams.measured("cpu") if grams is not None else MeasuredGrams([], {}, {}, [])
        self.nbytes += kept.nbytes() - (self.blocks[i].nbytes() if i in self.blocks else 0)
        if self.nbytes > self.limit_bytes:
            self.blocks, self.overflowed, self.nbytes = {}, True, 0
            return
        self.blocks[i] = kept

    def complete(self, num_blocks: int) -> bool:
        return not self.overflowed and all(i in self.blocks for i in range(num_blocks))

    def get(self, i: int, device) -> MeasuredGrams:
        return self.blocks[i].to(device)


def run_stored(block, acts: Activations, i: int, *, keep: bool, batches: int | None = None):
    """Block i over the stored batches; returns the outputs (keep=True) or None. Honours _Halt."""
    out = acts.new_like() if keep else None
    with torch.no_grad():
        for b, hidden in enumerate(acts):
            if batches is not None and b >= batches:
                break
            args, kwargs = acts.calls[i][b]
            try:
                result = block(hidden, *args, **kwargs)
            except _Halt:
                continue
            if keep:
                out.append(result[0] if isinstance(result, tuple) else result)
    return out


