"""How much a perplexity measured on a few windows would move on other windows of the same text.

A perplexity is exp(mu) with mu = sum_w s_w / sum_w t_w, the token-weighted mean NLL over windows w (s_w: the
window's summed NLL, t_w: its predicted tokens; `NLL.per_window`). Treating windows as independent draws
from the text, the standard error of this ratio estimator (linearised) is

    se(mu)^2 = n / (n - 1) * sum_w (s_w - mu t_w)^2 / (sum_w t_w)^2

and since d log(ppl) = d mu, se(mu) is the *relative* standard error of the perplexity (delta method).

A budget compares a compressed model with its base on the same windows, so what matters is the noise of
the PAIRED ratio ppl_c / ppl_b = exp(mu_c - mu_b): the same formula over the per-window differences
s_c,w - s_b,w. Both models find the same windows hard, so this is far smaller than either model's own
spread, which is why a 1% budget can be meaningful on a few thousand tokens at all.

Windows cut from one document are not independent, so with `block=1` these are lower bounds when
documents are long compared with the sample: on SmolLM2 and stdlib code, the spread of the paired ratio over
disjoint 4,096-token sets was about 3.6 times the formula's (benchmarks/eval_noise.py). `block=k` treats
each run of k consecutive windows (windows are cut from one token stream, so neighbours share documents) as
one sample ("batch means"): closer to the truth when there are enough blocks, noisier when there are few.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["PerplexityNoise", "ppl_noise"]


@dataclass(frozen=True)
class PerplexityNoise:
    windows: int
    perplexity: float  # of the measured model
    relative_se: float  # standard error of the perplexity, relative to it
    ratio: float | None = None  # perplexity / base perplexity, when a base was given
    ratio_relative_se: float | None = None  # standard error of that ratio, relative to it

    def resolves(self, relative_increase: float, z: float = 2.0) -> bool:
        """Whether a relative perplexity change of this size stands `z` standard errors above the paired
        noise (the base's own noise when no base was given)."""
        se = self.ratio_relative_se if self.ratio_relative_se is not None else self.relative_se
        return relative_increase > z * se


def _mean_and_se(sums: Sequence[float], tokens: Sequence[int]) -> tuple[float, float]:
    n = len(sums)
    total_tokens = float(sum(tokens))
    mu = math.fsum(sums) / total_tokens
    if n < 2:
        return mu, math.inf  # one window says nothing about the spread
    residual = math.fsum((s - mu * t) ** 2 for s, t in zip(sums, tokens, strict=True))
    return mu, math.sqrt(n / (n - 1) * residual) / total_tokens


def _blocks(values: Sequence[float], block: int) -> list[float]:
    return [math.fsum(values[i:i + block]) for i in range(0, len(values), block)]


def ppl_noise(per_window: Sequence[float], tokens_per_window: int | Sequence[int],
              base_per_window: Sequence[float] | None = None, *, block: int = 1) -> PerplexityNoise:
    """The relative standard error of a perplexity and, given the base model's per-window sums on the
    same windows, of the paired ratio perplexity / base perplexity.

    Args:
        per_window: Each window's summed NLL in nats (`NLL.per_window`).
        tokens_per_window: The tokens each window predicts (seq_len - 1), one number or one per window.
        base_per_window: The base model's per-window sums on the same windows, in the same order.
        block: Consecutive windows pooled into one sample (1: every window is a sample).

    Raises:
        ValueError: On no windows, mismatched lengths or non-positive token counts.
    """
    n = len(per_window)
    tokens = [tokens_per_window] * n if isinstance(tokens_per_window, int) else list(tokens_per_window)
    if n == 0 or len(tokens) != n or min(tokens) <= 0 or block < 1:
        raise ValueError("per-window sums and token counts must be non-empty, of one length, tokens > 0, "
                         "block >= 1")
    block_tokens = _blocks(tokens, block)
    mu, se = _mean_and_se(_blocks(per_window, block), block_tokens)
    if base_per_window is None:
        return PerplexityNoise(n, math.exp(mu), se)
    if len(base_per_window) != n:
        raise ValueError(f"base has {len(base_per_window)} windows, the model {n}: pair the same windows")
    diff = [c - b for c, b in zip(per_window, base_per_window, strict=True)]
    log_ratio, ratio_se = _mean_and_se(_blocks(diff, block), block_tokens)
    return PerplexityNoise(n, math.exp(mu), se, math.exp(log_ratio), ratio_se)
