"""LoRA-Pro (Wang et al., ICLR 2025): plain PEFT LoRA, trained by an optimizer that adjusts the LoRA gradients.

The adapter is ordinary LoRA, W = W0 + s B A (B m x r, A r x n, s = ``layer.scaling[adapter]``, read per layer:
alpha/r, or alpha/sqrt(r) with rsLoRA; the official code hard-codes s = 2). Autograd gives gA = s B^T g and
gB = s g A^T for the full-weight gradient g. LoRA-Pro replaces them by the pair (gA', gB') whose equivalent
full-weight step s (B gA' + gB' A) is closest to g -- the projection g - (I - P_B) g (I - P_A) of g onto the
tangent space of rank-r matrices at B A:

    gA' = (1/s^2) (B^T B)^-1 gA + X A
    gB' = (1/s^2) [gB - B (B^T B)^-1 B^T gB] (A A^T)^-1 - B X

with X (r x r) the solution of the Sylvester equation (B^T B) X + X (A A^T) = -(1/s^2) (B^T B)^-1 gA A^T, which
keeps (gA', gB') closest to (gA, gB). Everything is computed in float32 (or the parameter dtype if wider) with
r x r inverses from the spectra of B and A (QR, then an r x r SVD): O((m + n) r^2) per layer, never an m x m
projection.

Numerical guard (why, and its error): the adjustment runs in float64 whatever the parameters' dtype (r x r
and m x r work, negligible next to a forward pass), and its r x r inverses come from the spectra of B and A
themselves (a QR of the factor, then the SVD of its r x r triangle), never from eigh of a formed Gram matrix:
forming B^T B squares the condition number. The previous guard (eigh of the float32 Gram, eigenvalues below a
fixed 1e-6 of the largest cut, whatever the dtype) dropped real directions of any B with condition number
above 1e3: at cond 3e3 the equivalent gradient came out 20% off the exact tangent projection (37% at 1e5),
even in float64. Now a singular value of B (or A) counts as zero only below ``tolerance(dtype, r) =
max(r * eps(dtype), FLOOR)`` times the largest, with dtype the factors' (float32: 9.5e-7 at r 8, i.e. cond
~1e6): below that the gradients' own rounding (eps of their dtype, amplified by cond) exceeds the
direction's signal, and the result is the exact projection onto the directions kept. Measured error of
the equivalent gradient against the exact float64 projection, relative to it (tests/test_lora_pro.py):
float32 inputs 1e-5 at cond(B) 3e3, 3e-4 at 1e5, 3e-3 at 1e6 (about eps32 * cond / 30); float64 inputs
3e-11, 3e-8, 3e-6 (about eps64 * cond^2, the float64 arithmetic's own limit, hence FLOOR = 1e-8). When
B is zero (step 0 of LoRA, no singular value above sqrt(``ZERO``)) the guard gives the official special
case gA' = gA (= 0) and gB' = (1/s^2) gB (A A^T)^-1, no X, without a host sync. A frozen A (no gradient)
gives LoRA-FA's gB' = (1/s^2) gB (A A^T)^-1; a frozen B the mirror.

Modes (``AdapterSpec.lora_pro_mode``):
- ``efficient`` (default; the pre-release README default): torch's AdamW (decoupled weight decay on A and B) on
  the adjusted gradients. State = LoRA's (two moments per A and B): memory as LoRA. Layers of one shape are
  adjusted as one batch (one eigh call per shape), so the step costs a few dozen kernels, not dozens per layer.
  (gA', gB') is homogeneous in 1/s, so under Adam's normalisation s matters here only through eps.
- ``full``: the paper's AdamW algorithm: Adam moments of the full m x n equivalent gradient
  g~ = s B gA' + s gB' A (two m x n fp32 tensors per layer, kept in the state of B), G = m_hat / (sqrt(v_hat) + eps),
  then gA = s B^T G, gB = s G A^T, the closed form again, and A -= lr gA'', B -= lr gB''. Weight decay multiplies A
  and B by sqrt(1 - lr wd) (so s B A decays by 1 - lr wd); unlike the official code it never touches the frozen
  base W0, so the saved adapter reproduces the trained model. Here s sets the weight-space step: a wrong s
  (the official hard-coded 2) scales every step by s_true / s_used.

Parameters that are not a LoRA A/B pair (biases, DoRA magnitudes, ...) get plain AdamW. All state lives in
``optimizer.state`` (resumable with ``state_dict``). The pairs are found per PEFT layer by module, not by parameter
order, so any param-group layout works as long as a layer's A and B share a group.

Training-loop notes: step() reads the accumulated ``.grad`` (works after gradient accumulation and the DDP
all-reduce, and through accelerate's optimizer wrapper); gradient clipping before step() clips the raw LoRA
gradients, not the adjusted ones. FSDP / DeepSpeed ZeRO shard or flatten A and B and are not supported.
Official hyper-parameters: r 8, alpha 16, dropout 0, lr 2e-5, cosine, warmup 3%, wd 0.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.optim.adamw import adamw as functional_adamw

from lowrank_cli.errors import UsageError
from lowrank_cli.methods.finetune import lora
from lowrank_cli.methods.finetune.spec import AdapterSpec

__all__ = ["attach", "optimizer", "save", "LoraPair", "lora_pairs", "adjusted_grads", "LoraProOptimizer",
           "factor_gram_eig", "tolerance", "MODES", "ZERO"]

MODES = ("efficient", "full")
ZERO = 1e-30  # B^T B with no eigenvalue above this is B = 0 (step 0)
FLOOR = 1e-8  # float64's own limit: its error grows as eps64 * cond^2, ~1 at cond 1e8
WORK = torch.float64  # the adjustment's arithmetic, whatever the parameters' dtype

attach = lora.attach


@dataclass(eq=False)
class LoraPair:
    """One PEFT LoRA layer's adapter: A = lora_A weight (r x n), B = lora_B weight (m x r), scaling read live."""

    name: str
    a: object  # torch.nn.Parameter
    b: object
    layer: object
    adapter: str

    @property
    def scaling(self) -> float:
        return float(self.layer.scaling[self.adapter])


def lora_pairs(model) -> list[LoraPair]:
    """Every (lora_A, lora_B) pair of a PEFT model's linear LoRA layers, by module."""
    from peft.tuners.lora import LoraLayer

    pairs = []
    for name, module in model.named_modules():
        if not isinstance(module, LoraLayer):
            continue
        for adapter, a_mod in module.lora_A.items():
            b_mod = module.lora_B[adapter] if adapter in module.lora_B else None
            a, b = getattr(a_mod, "weight", None), getattr(b_mod, "weight", None)
            if a is None or b is None or a.dim() != 2 or b.dim() != 2:
                continue  # conv / embedding variants are left to plain AdamW
            pairs.append(LoraPair(name, a, b, module, adapter))
    return pairs


def tolerance(dtype, rank: int) -> float:
    """Relative cut on a factor's singular values for factors stored in `dtype`: rank * eps(dtype), floored at
    ``FLOOR`` (see the module docstring)."""
    return max(rank * torch.finfo(dtype).eps, FLOOR)


def _cut(sv, rtol: float):
    """Gram eigenvalues sv^2 with the numerically-zero ones set to 0, and their pseudo-inverses."""
    keep = (sv > rtol * sv.amax(dim=-1, keepdim=True)) & (sv * sv > ZERO)
    lam = torch.where(keep, sv * sv, torch.zeros_like(sv))
    inv = torch.where(keep, 1.0 / torch.where(keep, lam, torch.ones_like(lam)), torch.zeros_like(lam))
    return lam, inv


def factor_gram_eig(f, side: str, rtol: float | None = None):
    """(eigenvalues, pseudo-inverses, eigenvectors) of a factor's r x r Gram matrix, from the factor itself:
    side "cols" for B (m x r, Gram B^T B), "rows" for A (r x n, Gram A A^T); any leading batch dims.

    QR of the tall view (B, or A^T) then the SVD of the r x r triangle R: R^T R is the Gram matrix, so its
    right singular vectors are the eigenvectors and its singular values squared the eigenvalues, each
    accurate to eps * the largest singular value (not eps * the largest eigenvalue as eigh of a formed Gram
    would be). Singular values below ``rtol`` (default ``tolerance`` of f's dtype) times the largest count as
    zero. Computed in float64."""
    tall = f if side == "cols" else f.mT
    if rtol is None:
        rtol = tolerance(tall.dtype, tall.shape[-1])
    r = torch.linalg.qr(tall.to(WORK), mode="r")[1]
    _, sv, vh = torch.linalg.svd(r)
    lam, inv = _cut(sv, rtol)
    return lam, inv, vh.mT


def adjusted_grads(a, b, ga, gb, scaling, *, rtol: float | None = None, return_x: bool = False, eigs=None):
    """LoRA-Pro's (gA', gB') for one layer, or a batch of same-shape layers (leading dims; ``scaling`` then a
    tensor of shape (..., 1, 1)). One floating dtype throughout; gA or gB None = that factor is frozen.

    ``eigs`` = (factor_gram_eig(A, "rows"), factor_gram_eig(B, "cols")) when already computed; ``rtol``:
    the relative singular-value cut (default ``tolerance`` of B's dtype and the rank). The arithmetic is
    float64 (``WORK``); results come back in the inputs' dtype. Returns (gA', gB') (None for a frozen
    factor), plus X when ``return_x``.
    """
    dtype = b.dtype
    if rtol is None:
        rtol = tolerance(dtype, b.shape[-1])
    (mu, mu_inv, q2), (lam, lam_inv, q1) = eigs or (factor_gram_eig(a, "rows", rtol),
                                                    factor_gram_eig(b, "cols", rtol))
    a, b = a.to(WORK), b.to(WORK)
    ga = None if ga is None else ga.to(WORK)
    gb = None if gb is None else gb.to(WORK)
    scaling = scaling.to(WORK) if torch.is_tensor(scaling) else scaling
    out = _adjusted(a, b, ga, gb, scaling, (mu, mu_inv, q2), (lam, lam_inv, q1))
    out = tuple(None if t is None else t.to(dtype) for t in out)
    return out if return_x else out[:2]


def _adjusted(a, b, ga, gb, scaling, a_eigs, b_eigs):
    """(gA', gB', X) in one dtype (see adjusted_grads)."""
    (mu, mu_inv, q2), (lam, lam_inv, q1) = a_eigs, b_eigs
    inv_s2 = 1.0 / (scaling * scaling)
    aat_inv = (q2 * mu_inv[..., None, :]) @ q2.mT
    if ga is None:
        return None, None if gb is None else inv_s2 * (gb @ aat_inv), None
    btb_inv = (q1 * lam_inv[..., None, :]) @ q1.mT
    ga0 = inv_s2 * (btb_inv @ ga)
    if gb is None:
        return ga0, None, None
    gb0 = inv_s2 * ((gb - b @ (btb_inv @ (b.mT @ gb))) @ aat_inv)
    # Sylvester (B^T B) X + X (A A^T) = C in the two eigenbases: Y_ij = F_ij / (lam_i + mu_j)
    f = q1.mT @ (-(ga0 @ a.mT)) @ q2
    den = lam[..., :, None] + mu[..., None, :]
    y = torch.where(den > 0, f / torch.where(den > 0, den, torch.ones_like(den)), torch.zeros_like(f))
    x = q1 @ y @ q2.mT
    # B = 0 (step 0): the official special case gA' = gA (which is 0 there), chosen without a host sync
    ga_new = torch.where(lam.amax(dim=-1, keepdim=True)[..., None] > 0, ga0 + x @ a, ga)
    return ga_new, gb0 - b @ x, x


class LoraProOptimizer(torch.optim.Optimizer):
    """LoRA-Pro over PEFT LoRA pairs; AdamW for everything else. See the module docstring for the math.

    Layers of one shape (e.g. every q_proj) are adjusted together as one batch, and the AdamW update is
    torch's own functional AdamW over all tensors at once: a few dozen kernel launches per step, not a few
    dozen per layer.
    """

    def __init__(self, params, pairs, *, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, mode: str = "efficient", rtol: float | None = None):
        if mode not in MODES:
            raise UsageError(f"unknown LoRA-Pro mode {mode!r} (choose {' or '.join(MODES)})")
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, mode=mode)
        super().__init__(params, defaults)
        self.rtol = rtol
        group_of = {id(p): i for i, g in enumerate(self.param_groups) for p in g["params"]}
        self._pair_of: dict[int, LoraPair] = {}
        for pair in pairs:
            ga, gb = group_of.get(id(pair.a)), group_of.get(id(pair.b))
            if ga is None and gb is None:
                continue
            if ga is not None and gb is not None and ga != gb:
                raise UsageError(f"LoRA-Pro: lora_A and lora_B of {pair.name} are in different param groups")
            self._pair_of[id(pair.a)] = pair
            self._pair_of[id(pair.b)] = pair
        self.pairs = list({id(p): p for p in self._pair_of.values()}.values())

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            in_group = {id(q) for q in group["params"]}
            plain: list[tuple] = []  # (param, gradient) for AdamW
            buckets: dict[tuple, list[LoraPair]] = {}
            seen: set[int] = set()
            for p in group["params"]:
                pair = self._pair_of.get(id(p))
                if pair is None:
                    if p.grad is not None:
                        plain.append((p, p.grad))
                    continue
                if id(pair) in seen:
                    continue
                seen.add(id(pair))
                ta = id(pair.a) in in_group and pair.a.grad is not None
                tb = id(pair.b) in in_group and pair.b.grad is not None
                if ta or tb:
                    key = (tuple(pair.a.shape), tuple(pair.b.shape), pair.b.dtype, pair.b.device, ta, tb)
                    buckets.setdefault(key, []).append(pair)
            for key, pairs in buckets.items():
                plain += self._step_bucket(pairs, group, ta=key[4], tb=key[5])
            self._adamw(plain, group)
        return loss

    def _step_bucket(self, pairs: list[LoraPair], group, *, ta: bool, tb: bool) -> list[tuple]:
        """Adjust same-shape pairs as one batch; returns the (param, adjusted grad) AdamW applies (efficient)."""
        cdt = torch.promote_types(pairs[0].b.dtype, torch.float32)
        a = torch.stack([p.a for p in pairs]).to(cdt)
        b = torch.stack([p.b for p in pairs]).to(cdt)
        ga = torch.stack([p.a.grad for p in pairs]).to(cdt) if ta else None
        gb = torch.stack([p.b.grad for p in pairs]).to(cdt) if tb else None
        s = torch.tensor([p.scaling for p in pairs], dtype=cdt).to(b.device).view(-1, 1, 1)
        eigs = (factor_gram_eig(a, "rows", self.rtol), factor_gram_eig(b, "cols", self.rtol))
        ga, gb = adjusted_grads(a, b, ga, gb, s, rtol=self.rtol, eigs=eigs)
        if group["mode"] == "efficient":
            out = []
            for i, pair in enumerate(pairs):
                out += [(pair.a, ga[i])] if ta else []
                out += [(pair.b, gb[i])] if tb else []
            return out
        for i, pair in enumerate(pairs):
            layer_eigs = tuple(tuple(t[i] for t in e) for e in eigs)
            self._full_step(pair, group, a[i], b[i], ga[i] if ta else None, gb[i] if tb else None, ta, tb,
                            pair.scaling, cdt, layer_eigs)
        return []

    def _full_step(self, pair, group, a, b, ga, gb, ta, tb, s, cdt, eigs) -> None:
        beta1, beta2 = group["betas"]
        lr, wd, eps = group["lr"], group["weight_decay"], group["eps"]
        g_eq = torch.zeros(b.shape[0], a.shape[1], dtype=cdt, device=b.device)
        if ga is not None:
            g_eq.addmm_(b, ga, alpha=s)
        if gb is not None:
            g_eq.addmm_(gb, a, alpha=s)
        state = self.state[pair.b if tb else pair.a]
        if "exp_avg" not in state:
            state["step"] = torch.tensor(0.0)
            state["exp_avg"] = torch.zeros_like(g_eq)
            state["exp_avg_sq"] = torch.zeros_like(g_eq)
        m, v = (self._fp(state, k, cdt) for k in ("exp_avg", "exp_avg_sq"))
        state["step"] += 1
        step = float(state["step"])
        m.lerp_(g_eq, 1 - beta1)
        v.mul_(beta2).addcmul_(g_eq, g_eq, value=1 - beta2)
        big_g = (m / (1 - beta1 ** step)) / ((v / (1 - beta2 ** step)).sqrt_().add_(eps))
        ga2 = s * (b.T @ big_g) if ta else None
        gb2 = s * (big_g @ a.T) if tb else None
        ga2, gb2 = adjusted_grads(a, b, ga2, gb2, s, rtol=self.rtol, eigs=eigs)  # same A, B: same eigs
        # decay s B A (never W0) by 1 - lr wd: each trainable factor by its share of it
        decay = (1 - lr * wd) ** (1.0 / (int(ta) + int(tb))) if wd else 1.0
        for p, cur, upd in ((pair.a, a, ga2), (pair.b, b, gb2)):
            if upd is not None:
                p.copy_((cur * decay).add_(upd, alpha=-lr))

    @staticmethod
    def _fp(state, key, cdt):
        t = state[key]
        if t.dtype != cdt:  # load_state_dict casts state to the param dtype; keep the m x n moments in fp32
            t = state[key] = t.to(cdt)
        return t

    def _adamw(self, items: list[tuple], group) -> None:
        """torch's functional AdamW (what torch.optim.AdamW runs) on (param, gradient) pairs; state as AdamW's."""
        if not items:
            return
        params, grads, exp_avgs, exp_avg_sqs, steps = [], [], [], [], []
        for p, g in items:
            state = self.state[p]
            if "exp_avg" not in state:
                state["step"] = torch.tensor(0.0)
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            params.append(p)
            grads.append(g.to(p.dtype))
            exp_avgs.append(state["exp_avg"])
            exp_avg_sqs.append(state["exp_avg_sq"])
            steps.append(state["step"])
        beta1, beta2 = group["betas"]
        functional_adamw(params, grads, exp_avgs, exp_avg_sqs, [], steps, amsgrad=False, beta1=beta1, beta2=beta2,
                         lr=group["lr"], weight_decay=group["weight_decay"], eps=group["eps"], maximize=False)


def optimizer(model, spec: AdapterSpec, *, lr: float, weight_decay: float = 0.0, betas=(0.9, 0.999),
              eps: float = 1e-8):
    """LoRA-Pro over the model's LoRA pairs (mode from ``spec.lora_pro_mode``); AdamW for other trainables."""
    if spec.lora_pro_mode not in MODES:
        raise UsageError(f"unknown LoRA-Pro mode {spec.lora_pro_mode!r} (choose {' or '.join(MODES)})")
    pairs = lora_pairs(model)
    if not pairs:
        raise UsageError("LoRA-Pro found no LoRA layers in the model (attach LoRA adapters first)")
    params = [p for p in model.parameters() if p.requires_grad]
    return LoraProOptimizer(params, pairs, lr=lr, betas=betas, eps=eps,
                                           weight_decay=weight_decay, mode=spec.lora_pro_mode)


def save(model, folder: Path, spec: AdapterSpec, *, base_name_or_path: str | None = None) -> None:
    """A plain PEFT LoRA adapter (LoRA-Pro changes only the optimizer) plus ``lora_pro.json`` metadata."""
    lora.save(model, folder, spec, base_name_or_path=base_name_or_path)
    meta = {"method": "lora-pro", "mode": spec.lora_pro_mode, "x": "sylvester",
            "tolerance": "singular values of A, B below max(dims) * eps(dtype) of the largest count as zero",
            "scaling": "per layer, from PEFT's layer.scaling"}
    (Path(folder) / "lora_pro.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
