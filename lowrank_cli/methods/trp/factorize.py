"""TRP's last step: each trained layer becomes a low-rank pair at the rank a final rule gives.

Final rules (exactly one of `threshold` / `energy`):
  threshold  keep the singular values >= threshold (the authors' `ValueThreshold(0.05)`): a TRP-trained
             weight is already near low rank (its last truncation left rank k; the few plain steps since
             added only small values), so this drops what the training already removed and costs little;
  energy     the smallest rank keeping that fraction of the squared singular values (the rule TRP's
             truncations use during training).

Linear (the LM setting): W (m x n) -> up (m x k) @ down (k x n), up = U_k (orthonormal), down = S_k V_k^T (the
convention of `lowrank decompose`), kept only below break-even, k (m + n) < m n; layers at or above it stay
dense, because the pair would be no smaller.

Conv2d (the paper's setting), channel-wise "NC" scheme (Zhang et al.): W (N x C x kh x kw) seen as
N x (C kh kw) -> a conv C -> k with the original kernel size, stride, padding, dilation and padding mode, then a
1 x 1 conv k -> N carrying the bias. Unlike the official code, padding and stride are taken from the layer
(it hard-codes padding 1 / stride 1 and never factorizes strided convs) and the bias test is
`bias is not None` (its `if m.bias:` fails on a bias tensor).
"""

from __future__ import annotations

from dataclasses import dataclass

from lowrank_cli.methods.trp.svd import svd_above, truncated_svd

__all__ = ["LayerRank", "choose_rank", "linear_factors", "conv_nc_pair", "replace_linears", "replace_convs"]


@dataclass(frozen=True)
class LayerRank:
    name: str
    m: int
    n: int
    rank: int  # the rank the final rule gives
    kept_energy: float
    factorized: bool  # False: at or above break-even, stays dense

    @property
    def params_after(self) -> int:
        return self.rank * (self.m + self.n) if self.factorized else self.m * self.n


def choose_rank(name: str, weight, energy: float | None = None, method: str = "exact", *,
                threshold: float | None = None) -> tuple[LayerRank, object]:
    """(LayerRank, Truncation) for one weight (Linear, or Conv2d in its NC view), by singular-value
    `threshold` or by `energy` (exactly one)."""
    if (energy is None) == (threshold is None):
        raise ValueError("give exactly one of energy and threshold")
    t = truncated_svd(weight, energy, method=method) if threshold is None else svd_above(weight, threshold)
    m, n = weight.shape[0], weight[0].numel()
    return LayerRank(name, m, n, t.k, t.kept_energy, t.k * (m + n) < m * n), t


def linear_factors(t) -> tuple:
    """(up, down) = (U_k, S_k V_k^T) from a Truncation."""
    return t.u.contiguous(), (t.s[:, None] * t.v.mH).contiguous()


def conv_nc_pair(conv, t):
    """nn.Sequential(conv C -> k, 1 x 1 conv k -> N) equal to `conv` with its weight replaced by U_k S_k V_k^T."""
    from torch import nn

    if conv.groups != 1:
        raise ValueError("grouped convolutions have no channel-wise low-rank view")
    n_out, c_in, kh, kw = conv.weight.shape
    k = t.k
    up, down = linear_factors(t)
    first = nn.Conv2d(c_in, k, (kh, kw), stride=conv.stride, padding=conv.padding, dilation=conv.dilation,
                      bias=False, padding_mode=conv.padding_mode, device=conv.weight.device,
                      dtype=conv.weight.dtype)
    second = nn.Conv2d(k, n_out, 1, bias=conv.bias is not None, device=conv.weight.device,
                       dtype=conv.weight.dtype)
    with _no_grad():
        first.weight.copy_(down.reshape(k, c_in, kh, kw))
        second.weight.copy_(up.reshape(n_out, k, 1, 1))
        if conv.bias is not None:
            second.bias.copy_(conv.bias)
    return nn.Sequential(first, second)


def _no_grad():
    import torch

    return torch.no_grad()


def _set(model, name: str, module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def replace_linears(model, targets, energy: float | None = None, method: str = "exact", *,
                    threshold: float | None = None) -> list[LayerRank]:
    """Factorize the named nn.Linear modules of `model` in place (LowRankLinear, the checkpoint format's
    layer) where below break-even; returns every target's LayerRank (dense ones with factorized=False)."""
    from lowrank_cli.modeling.lowrank_modeling import LowRankLinear

    chosen = []
    with _no_grad():
        for name in targets:
            linear = model.get_submodule(name)
            rank, t = choose_rank(name, linear.weight, energy, method, threshold=threshold)
            chosen.append(rank)
            if not rank.factorized:
                continue
            up, down = linear_factors(t)
            new = LowRankLinear(linear.in_features, linear.out_features, rank.rank, bias=linear.bias is not None,
                                device=linear.weight.device, dtype=linear.weight.dtype)
            new.up.weight.copy_(up)
            new.down.weight.copy_(down)
            if linear.bias is not None:
                new.up.bias.copy_(linear.bias)
            _set(model, name, new)
    return chosen


def replace_convs(model, targets, energy: float | None = None, method: str = "exact", *,
                  threshold: float | None = None) -> list[LayerRank]:
    """Factorize the named nn.Conv2d modules in place (channel-wise pairs) where below break-even."""
    chosen = []
    for name in targets:
        conv = model.get_submodule(name)
        rank, t = choose_rank(name, conv.weight, energy, method, threshold=threshold)
        chosen.append(rank)
        if rank.factorized:
            _set(model, name, conv_nc_pair(conv, t))
    return chosen
