"""TRP math: energy rank, truncation, the nuclear sub-gradient, the callback, final factorization (Linear and
channel-wise Conv2d), all against float64 references."""

from __future__ import annotations

import pytest
import torch

from lowrank_cli.methods.trp.callback import TRPCallback
from lowrank_cli.methods.trp.factorize import conv_nc_pair, replace_linears
from lowrank_cli.methods.trp.svd import energy_rank, nuclear_subgradient, project, svd_above, truncated_svd, value_rank


def with_spectrum(m, n, s, seed=0):
    gen = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(m, len(s), generator=gen, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(n, len(s), generator=gen, dtype=torch.float64))
    return (u * torch.as_tensor(s, dtype=torch.float64)) @ v.T


def reference_rank(s, e):
    sq = [float(x) ** 2 for x in s]
    total, acc = sum(sq), 0.0
    for k, x in enumerate(sq, 1):
        acc += x
        if acc >= e * total:
            return k
    return len(sq)


@pytest.mark.parametrize("energy", [0.5, 0.9, 0.95, 0.99, 1.0])
def test_energy_rank_is_smallest_k_reaching_energy(energy):
    s = torch.tensor([5.0, 3.0, 2.0, 1.0, 0.5, 0.1], dtype=torch.float64)
    k = energy_rank(s, energy)
    assert k == reference_rank(s.tolist(), energy)
    frac = (s[:k] ** 2).sum() / (s ** 2).sum()
    assert frac >= energy - 1e-15
    if k > 1:
        assert (s[: k - 1] ** 2).sum() / (s ** 2).sum() < energy


def test_energy_rank_exact_boundary():
    s = torch.tensor([3.0, 1.0], dtype=torch.float64)  # 9 / 10 of the energy in the first value
    assert energy_rank(s, 0.9) == 1 and energy_rank(s, 0.9000001) == 2


@pytest.mark.parametrize("energy", [0.6, 0.9])
def test_truncation_keeps_asked_energy(energy):
    s = [10 * 0.8 ** i for i in range(24)]
    w = with_spectrum(40, 30, s)
    t = truncated_svd(w, energy, method="exact")
    k = reference_rank(s, energy)
    assert t.k == k and t.method == "exact"
    assert t.kept_energy >= energy and t.kept_energy == pytest.approx(sum(x * x for x in s[:k]) / sum(x * x for x in s))
    # the projection is the best rank-k approximation: its error is the dropped energy
    err = torch.linalg.norm(w - project(t)) ** 2
    assert float(err) == pytest.approx(sum(x * x for x in s[k:]), rel=1e-9)
    assert int(torch.linalg.matrix_rank(project(t))) == k


def test_randomized_svd_finds_the_same_rank():
    s = [10 * 0.9 ** i for i in range(120)]
    w = with_spectrum(300, 260, s).float()
    exact = truncated_svd(w, 0.9, method="exact")
    rnd = truncated_svd(w, 0.9, method="randomized", guess=10)
    assert rnd.method == "randomized" and rnd.k >= exact.k and rnd.k <= exact.k + 1
    assert rnd.kept_energy >= 0.9 - 1e-4
    torch.testing.assert_close(project(rnd), project(exact), rtol=0, atol=5e-3)
    # a private seed: the caller's random stream is untouched, and the result is reproducible
    torch.manual_seed(5)
    before = torch.rand(3)
    torch.manual_seed(5)
    again = truncated_svd(w, 0.9, method="randomized", guess=10)
    assert torch.equal(torch.rand(3), before) and torch.equal(again.s, rnd.s)


def test_subgradient_is_uv_of_current_weight():
    w = with_spectrum(20, 16, [4, 3, 2.5, 1, 0.5, 0.2, 0.1])
    t = truncated_svd(w, 0.9, method="exact")
    truncated = project(t)
    u, s, vh = torch.linalg.svd(truncated)  # float64 reference on the weight the step runs on
    r = int((s > 1e-9 * s[0]).sum())
    assert r == t.k
    torch.testing.assert_close(nuclear_subgradient(t, 3e-4), 3e-4 * u[:, :r] @ vh[:r], rtol=1e-9, atol=1e-12)


class Two(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a = torch.nn.Linear(12, 10, dtype=torch.float64)
        self.b = torch.nn.Linear(10, 8, dtype=torch.float64)

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


def test_callback_truncates_on_period_and_adds_subgradient():
    torch.manual_seed(0)
    net = Two()
    cb = TRPCallback([("a", net.a), ("b", net.b)], period=3, energy=0.8, nuclear_weight=0.1)
    original = net.a.weight.detach().clone()
    cb.on_step_start(net, 0)
    ref = truncated_svd(original, 0.8, method="exact")
    torch.testing.assert_close(net.a.weight.detach(), project(ref), rtol=1e-12, atol=1e-12)
    net(torch.randn(4, 12, dtype=torch.float64)).sum().backward()
    grad = net.a.weight.grad.detach().clone()
    cb.on_before_optimizer_step(net, 0)
    torch.testing.assert_close(net.a.weight.grad, grad + 0.1 * ref.u @ ref.v.T, rtol=1e-12, atol=1e-12)
    logs = {}
    cb.on_step_end(net, 0, logs)
    assert cb.history[0]["ranks"]["a"] == ref.k and 0 < logs["trp_rank_fraction"] <= 1
    # steps 1 and 2 are ordinary
    before = net.a.weight.detach().clone()
    net.a.weight.grad = None
    cb.on_step_start(net, 1)
    cb.on_before_optimizer_step(net, 1)
    assert torch.equal(net.a.weight, before) and net.a.weight.grad is None and len(cb.history) == 1
    # state round trip
    other = TRPCallback([("a", net.a), ("b", net.b)], period=3, energy=0.8)
    other.load_state_dict(cb.state_dict())
    assert other.history == cb.history and other.last_rank == cb.last_rank


def test_callback_rejects_bad_settings():
    net = Two()
    for kwargs in ({"period": 0}, {"energy": 0.0}, {"energy": 1.5}, {"nuclear_weight": -1}):
        with pytest.raises(ValueError):
            TRPCallback([("a", net.a)], **kwargs)


def test_replace_linears_keeps_break_even_layers_dense():
    torch.manual_seed(0)
    net = Two()
    with torch.no_grad():
        net.a.weight.copy_(with_spectrum(10, 12, [3, 1]))  # rank 2: factorized
    x = torch.randn(5, 12, dtype=torch.float64)
    ta = truncated_svd(net.a.weight, 0.95, method="exact")
    tb = truncated_svd(net.b.weight, 0.95, method="exact")
    with torch.no_grad():
        expected = torch.nn.functional.linear(torch.relu(torch.nn.functional.linear(x, project(ta), net.a.bias)),
                                              net.b.weight, net.b.bias)
    ranks = {r.name: r for r in replace_linears(net, ["a", "b"], 0.95)}
    assert ranks["a"].factorized and ranks["a"].rank == 2 and type(net.a).__name__ == "LowRankLinear"
    assert tb.k * (10 + 8) >= 80 and not ranks["b"].factorized and isinstance(net.b, torch.nn.Linear)
    torch.testing.assert_close(net(x).detach(), expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("stride,padding,dilation,bias", [(2, 0, 1, True), (2, 2, 2, True), (1, 2, 2, False),
                                                          (2, (1, 0), (2, 1), True)])
def test_conv_nc_pair_equals_truncated_conv(stride, padding, dilation, bias):
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(6, 10, (3, 3), stride=stride, padding=padding, dilation=dilation, bias=bias,
                           dtype=torch.float64)
    t = truncated_svd(conv.weight, 0.7, method="exact")
    assert 1 <= t.k < 10
    pair = conv_nc_pair(conv, t)
    x = torch.randn(2, 6, 13, 11, dtype=torch.float64)
    expected = torch.nn.functional.conv2d(x, project(t, conv.weight.shape), conv.bias, stride, padding, dilation)
    with torch.no_grad():
        got = pair(x)
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    assert (pair[1].bias is not None) == bias and pair[0].weight.shape == (t.k, 6, 3, 3)


def test_conv_callback_uses_channel_view():
    conv = torch.nn.Conv2d(4, 8, 3, dtype=torch.float64)
    cb = TRPCallback([("conv", conv)], period=1, energy=0.5)
    cb.on_step_start(conv, 0)
    assert int(torch.linalg.matrix_rank(conv.weight.detach().reshape(8, -1))) == cb.history[0]["ranks"]["conv"]
    with pytest.raises(ValueError):
        TRPCallback([("g", torch.nn.Conv2d(4, 8, 3, groups=2))])


def test_auto_uses_randomized_svd_for_large_layers_only(monkeypatch):
    from lowrank_cli.methods.trp import svd

    w = with_spectrum(300, 260, [10 * 0.9 ** i for i in range(120)]).float()
    assert truncated_svd(w, 0.9, method="auto").method == "exact"  # below the size threshold
    monkeypatch.setattr(svd, "RANDOMIZED_MIN_DIM", 100)
    auto = truncated_svd(w, 0.9, method="auto", guess=20)
    assert auto.method == "randomized" and auto.kept_energy >= 0.9 - 1e-4
    # a probe that would need half of min(m, n) or more gains nothing: the exact SVD is used
    assert truncated_svd(w, 0.999, method="auto", guess=200).method == "exact"


def test_final_threshold_keeps_singular_values_above_it():
    """The authors' ValueThreshold: k = #(s >= threshold), at least 1; the factorized layer is the
    projection onto those values (checked against a weight built with known singular values)."""
    g = torch.Generator().manual_seed(3)
    u, _ = torch.linalg.qr(torch.randn(12, 6, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(9, 6, generator=g, dtype=torch.float64))
    s = torch.tensor([2.0, 1.0, 0.3, 0.06, 0.04, 0.001], dtype=torch.float64)
    w = (u * s) @ v.T
    assert value_rank(s, 0.05) == 4 and value_rank(s, 5.0) == 1 and value_rank(s, 0.0) == 6
    t = svd_above(w, 0.05)
    assert t.k == 4
    torch.testing.assert_close(project(t), (u[:, :4] * s[:4]) @ v[:, :4].T)
    net = torch.nn.Sequential(torch.nn.Linear(9, 12, bias=False).double())
    with torch.no_grad():
        net[0].weight.copy_(w)
    (chosen,) = replace_linears(net, ["0"], threshold=0.05)
    assert chosen.rank == 4 and chosen.factorized
    with pytest.raises(ValueError, match="exactly one"):
        replace_linears(net, ["0"], 0.9, threshold=0.05)
