"""Perplexity with one documented protocol, computed two ways that must agree.

Protocol: non-overlapping windows of `seq_len` tokens (see `lowrank_cli.data.windows`); inside each window
every token after the first is predicted from the ones before it; perplexity = exp(sum NLL / tokens
predicted), i.e. token-weighted over all windows, in float64.

- `nll_full`: the whole model in memory (transformers' own forward).
- `nll_streamed`: one decoder block in memory at a time (`lowrank_cli.engine.streamed`), for models larger
  than memory. Same numbers up to floating-point reassociation.

Both can also return each window's own NLL sum (`per_window=True`), from which `lowrank_cli.eval.noise`
estimates how much a perplexity measured on these windows would move on other windows.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

__all__ = ["NLL", "nll_full", "nll_streamed", "nll_of_logits", "nll_rows_of_logits", "next_token_loss"]


@dataclass
class NLL:
    total: float  # summed negative log-likelihood, nats
    tokens: int  # predicted tokens
    # Each window's summed NLL (nats), in window order, when asked for (per_window=True); each window
    # predicts seq_len - 1 tokens.
    per_window: list[float] | None = field(default=None, compare=False)

    @property
    def mean(self) -> float:
        return self.total / self.tokens

    @property
    def perplexity(self) -> float:
        return math.exp(self.mean)


def next_token_loss(logits, ids):
    """Summed next-token NLL of one batch as a tensor (float32 softmax; differentiable)."""
    import torch.nn.functional as F

    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten(), reduction="sum")


def nll_of_logits(logits, ids) -> float:
    """Summed next-token NLL of one batch, accumulated by the caller in float64."""
    return float(next_token_loss(logits, ids).double())


def nll_rows_of_logits(logits, ids) -> list[float]:
    """Summed next-token NLL of each row (window) of one batch, as float64 Python floats."""
    import torch.nn.functional as F

    losses = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten(), reduction="none")
    return losses.view(ids.shape[0], -1).double().sum(dim=1).tolist()


def nll_full(model, windows, batch_size: int = 1, progress=None, *, per_window: bool = False) -> NLL:
    """NLL of an in-memory model over [n, seq] windows (each window's sum too with per_window=True)."""
    import torch

    device = next(model.parameters()).device
    total, count = 0.0, 0
    rows: list[float] = []
    with torch.no_grad():
        for start in range(0, windows.shape[0], batch_size):
            ids = windows[start:start + batch_size].to(device)
            logits = model(input_ids=ids, use_cache=False).logits
            if per_window:
                sums = nll_rows_of_logits(logits, ids)
                rows.extend(sums)
                total += math.fsum(sums)
            else:
                total += nll_of_logits(logits, ids)
            count += ids[:, 1:].numel()
            if progress:
                progress(min(start + batch_size, windows.shape[0]), windows.shape[0])
    return NLL(total, count, rows if per_window else None)


def nll_streamed(streamed, windows, batch_size: int = 1, progress=None, *, per_window: bool = False) -> NLL:
    """NLL of a `StreamedModel`, one block materialized at a time (each window's sum too with
    per_window=True)."""
    acts = streamed.run_blocks(streamed.capture(windows, batch_size), progress)
    if per_window:
        rows = streamed.head_nll_rows(acts, windows, batch_size)
        total, count = math.fsum(rows), int(windows[:, 1:].numel())
    else:
        rows = None
        total, count = streamed.head_nll(acts, windows, batch_size)
    acts.release()
    return NLL(total, count, rows)
