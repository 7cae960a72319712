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
r x r inverses from ``eigh`` of the two SPD Gram matrices: O((m + n) r^2) per layer, never an m x m projection.

Numerical guards (why): the Gram matrices are formed in float32, so their eigenvalues are only resolved down to
about eps32 * lambda_max (~1e-7 relative, times the summation's growth); inverting anything smaller amplifies
rounding noise by > 1e6 (the official pinv(M + 1e-8 I) is exactly that fragile once B is small). Eigenvalues below
``RTOL = 1e-6`` times the largest are therefore treated as zero (pseudo-inverse): the formulas above stay the exact
tangent-space projection for the numerical range of B (and A). When B is zero (step 0 of LoRA, all eigenvalues
below ``ZERO = 1e-30``) this gives the official special case gA' = gA (= 0) and gB' = (1/s^2) gB (A A^T)^-1, no X,
without a host sync. A frozen A (no gradient) gives LoRA-FA's gB' = (1/s^2) gB (A A^T)^-1; a frozen B the mirror.

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
           "gram_eig", "MODES", "RTOL", "ZERO"]

MODES = ("efficient", "full")
RTOL = 1e-6  # eigenvalues of a fp32 Gram matrix below RTOL * largest are rounding noise
ZERO = 1e-30  # B^T B with no eigenvalue above this is B = 0 (step 0)

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


def gram_eig(m, rtol: float = RTOL):
    """eigh of SPD r x r Gram matrices (any leading batch dims): eigenvalues with noise set to 0, their
    pseudo-inverses, eigenvectors."""
    lam, q = torch.linalg.eigh(m)
    keep = (lam > rtol * lam[..., -1:].clamp_min(0)) & (lam > ZERO)
    lam = torch.where(keep, lam, torch.zeros_like(lam))
    inv = torch.where(keep, 1.0 / torch.where(keep, lam, torch.ones_like(lam)), torch.zeros_like(lam))
    return lam, inv, q


def adjusted_grads(a, b, ga, gb, scaling, *, rtol: float = RTOL, return_x: bool = False, eigs=None):
    """LoRA-Pro's (gA', gB') for one layer, or a batch of same-shape layers (leading dims; ``scaling`` then a
    tensor of shape (..., 1, 1)). One floating dtype throughout; gA or gB None = that factor is frozen.

    ``eigs`` = (gram_eig(A A^T), gram_eig(B^T B)) when already computed. Returns (gA', gB') (None for a
    frozen factor), plus X when ``return_x``.
    """
    (mu, mu_inv, q2), (lam, lam_inv, q1) = eigs or (gram_eig(a @ a.mT, rtol), gram_eig(b.mT @ b, rtol))
    inv_s2 = 1.0 / (scaling * scaling)
    aat_inv = (q2 * mu_inv[..., None, :]) @ q2.mT
    if ga is None:
        gb_new = None if gb is None else inv_s2 * (gb @ aat_inv)
        return (None, gb_new, None) if return_x else (None, gb_new)
    btb_inv = (q1 * lam_inv[..., None, :]) @ q1.mT
    ga0 = inv_s2 * (btb_inv @ ga)
    if gb is None:
        return (ga0, None, None) if return_x else (ga0, None)
    gb0 = inv_s2 * ((gb - b @ (btb_inv @ (b.mT @ gb))) @ aat_inv)
    # Sylvester (B^T B) X + X (A A^T) = C in the two eigenbases: Y_ij = F_ij / (lam_i + mu_j)
    f = q1.mT @ (-(ga0 @ a.mT)) @ q2
    den = lam[..., :, None] + mu[..., None, :]
    y = torch.where(den > 0, f / torch.where(den > 0, den, torch.ones_like(den)), torch.zeros_like(f))
    x = q1 @ y @ q2.mT
    # B = 0 (step 0): the official special case gA' = gA (which is 0 there), chosen without a host sync
    ga_new = torch.where(lam[..., -1:, None] > 0, ga0 + x @ a, ga)
    gb_new = gb0 - b @ x
    return (ga_new, gb_new, x) if return_x else (ga_new, gb_new)


class LoraProOptimizer(torch.optim.Optimizer):
    """LoRA-Pro over PEFT LoRA pairs; AdamW for everything else. See the module docstring for the math.

    Layers of one shape (e.g. every q_proj) are adjusted together as one batch, and the AdamW update is
    torch's own functional AdamW over all tensors at once: a few dozen kernel launches per step, not a few
    dozen per layer.
    """

    def __init__(self, params, pairs, *, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, mode: str = "efficient", rtol: float = RTOL):
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
        eigs = (gram_eig(a @ a.mT, self.rtol), gram_eig(b.mT @ b, self.rtol))
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
    meta = {"method": "lora-pro", "mode": spec.lora_pro_mode, "x": "sylvester", "rtol": RTOL,
            "scaling": "per layer, from PEFT's layer.scaling"}
    (Path(folder) / "lora_pro.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
