"""LoLDU (Shi et al., arXiv 2410.13618): train only the diagonal of an LDU factorisation of each weight.

For a target ``nn.Linear`` with weight W0 (m x n): P, L, U = lu(W0) (partial pivoting), D = diag(U),
U~ = D^-1 U, so W0 = P L diag(D) U~. The first r factors are kept: L_r = L[:, :r], D_r = D[:r], U_r = U~[:r].
The official code writes the residual W_res = W0 - sigma P L_r diag(D_r) U_r into the layer and computes
x W_res^T + sigma ((x U_r^T) * z) (P L_r)^T with z initialised to D_r: equal to the base only up to rounding
W_res to the model's dtype. Here the layer keeps W0 untouched and computes the same function as

    y = x W0^T + sigma ((x U_r^T) * (z - D_r)) (P L_r)^T     (sigma = alpha / r; only z in R^r is trained)

so at z = D_r the update branch is exactly zero and the model starts as the base bit for bit; the gradient
with respect to z is the official one. P L_r is stored as an m x r buffer (rows of L_r scattered by the pivot
permutation): no m x m matrix and no m x n delta is ever built (the official code keeps a dense m x m P and
rebuilds the m x n delta on every forward).

The LU runs once per layer in float64 with LAPACK's ``lu_factor`` (the pivot vector, not a dense P): partial
pivoting in float32 has growth-factor-amplified errors in the factors. The factors are the r-step
Gaussian-elimination skeleton of W0 (exact on the first r columns and pivot rows), not ordered by importance.
A pivot |D_i| <= eps32 * max|W0| among the first r would make U_r blow up (the official code divides by zero):
``attach`` refuses it with a UsageError naming the layer.

Hyper-parameters (``finetune``'s defaults for loldu: methods/finetune/spec.py DEFAULTS, measured):
- ``spec.alpha`` is LoLDU's ``lora_alpha``: sigma = alpha / r. The official default is alpha = 1 (sigma = 1/r).
  sigma scales the step in weight space (Adam makes z's step ~lr), so sigma * lr is what matters: sigma = 1/r
  with a LoRA-sized lr (2e-4) barely moves the model.
- lr: the official demo uses AdamW lr 1e-3. Rank: official examples 4-15. Weight decay pulls z towards D_r
  (i.e. decays the update, never the base's own LU component); the default 0 is the official setting. Dropout,
  when > 0, drops the input of the update's branch.

Export (``save``): the update sigma P L_r diag(z - D_r) U_r has rank r, so it is written as a standard PEFT LoRA
adapter on the UNMODIFIED base W0: lora_A = U_r, lora_B = sigma P L_r diag(z - D_r), with lora_alpha = r (PEFT
scaling 1). Plain ``PeftModel.from_pretrained(base, folder)`` loads it; ``loldu.json`` holds rank, sigma, and per
layer z, D_r and pivot statistics. Resume: ``attach`` recomputes the factors from the base weights
(deterministic on one machine), then the loop restores z.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from lowrank_cli.errors import UsageError
from lowrank_cli.methods.finetune.spec import AdapterSpec

__all__ = ["attach", "optimizer", "save", "LoLDULinear", "ldu_factors", "loldu_layers", "lora_export"]

_PIVOT_RTOL = torch.finfo(torch.float32).eps


def ldu_factors(w0: torch.Tensor, rank: int, *, name: str = "layer"):
    """(P L_r as m x r, D_r, U_r) of w0 in float64, from LAPACK's pivoted LU (pivot vector, never a dense P)."""
    w = w0.detach().to(torch.float64)
    if w.device.type not in ("cpu", "cuda"):
        w = w.cpu()
    m, n = w.shape
    lu, piv, _ = torch.linalg.lu_factor_ex(w)  # zero pivots are reported below
    lower = torch.tril(lu[:, :rank], -1)
    lower[:rank, :rank] += torch.eye(rank, dtype=w.dtype, device=w.device)
    upper = torch.triu(lu[:rank, :])
    d = torch.diagonal(upper).clone()
    tol = _PIVOT_RTOL * w.abs().max()
    small = (d.abs() <= tol).nonzero()
    if len(small):
        i = int(small[0])
        fix = f"lower --rank to {i} or leave it out" if i else "leave it out of --targets"
        raise UsageError(f"loldu: {name} ({m}x{n}) has a zero LU pivot at position {i + 1} of {rank}; {fix}")
    # LAPACK applies row swaps i <-> piv[i] in order; rows of L land where the swaps put them: (P L)[perm] = L
    perm = list(range(m))
    for i, p in enumerate(piv.tolist()):
        perm[i], perm[p - 1] = perm[p - 1], perm[i]
    pl = torch.empty_like(lower)
    pl[torch.tensor(perm, device=w.device)] = lower
    return pl, d, upper / d[:, None]


class LoLDULinear(nn.Module):
    """An ``nn.Linear`` (W0, untouched) plus the LoLDU update branch with the trainable diagonal ``z`` (module doc)."""

    def __init__(self, base: nn.Linear, pl: torch.Tensor, d: torch.Tensor, u: torch.Tensor, sigma: float,
                 dropout: float = 0.0):
        super().__init__()
        dev = base.weight.device
        self.base = base
        self.sigma = float(sigma)
        self.register_buffer("pl", pl.to(dev, torch.float32).contiguous())  # P L_r, m x r
        self.register_buffer("u", u.to(dev, torch.float32).contiguous())  # U_r, r x n
        self.register_buffer("d", d.to(dev, torch.float32).contiguous())  # D_r (z at init)
        self.z = nn.Parameter(d.to(dev, torch.float32).clone())
        self.dropout = nn.Dropout(dropout) if dropout > 0 else None

    @classmethod
    def install(cls, base: nn.Linear, pl, d, u, sigma: float, dropout: float = 0.0) -> LoLDULinear:
        """Wrap ``base`` (its weight W0 left as it is, frozen)."""
        base.weight.requires_grad_(False)
        return cls(base, pl, d, u, sigma, dropout)

    @property
    def weight(self):  # code that reads ``module.weight`` (dtype, device) sees the base's
        return self.base.weight

    @property
    def bias(self):
        return self.base.bias

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    @property
    def rank(self) -> int:
        return self.z.numel()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        h = x.to(self.u.dtype)
        if self.dropout is not None and self.training:
            h = self.dropout(h)
        xu = F.linear(h, self.u) * (self.sigma * (self.z - self.d))
        return y + F.linear(xu, self.pl).to(y.dtype)

    def lora_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(lora_A, lora_B) with PEFT scaling 1 reproducing this layer's update on the original weight."""
        with torch.no_grad():
            return self.u.clone(), self.pl * (self.sigma * (self.z - self.d))

    def extra_repr(self) -> str:
        return f"rank={self.rank}, sigma={self.sigma:g}"


def _unwrap(model):
    return model.module if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)) else model


def loldu_layers(model) -> dict[str, LoLDULinear]:
    return {n: m for n, m in _unwrap(model).named_modules() if isinstance(m, LoLDULinear)}


def _target(model, name: str, rank: int) -> nn.Linear:
    try:
        module = model.get_submodule(name)
    except AttributeError:
        raise UsageError(f"loldu: the model has no module {name!r}") from None
    if isinstance(getattr(module, "up", None), nn.Linear) and isinstance(getattr(module, "down", None), nn.Linear):
        raise UsageError(f"loldu: {name} is factorized; target {name}.up and {name}.down instead")
    w = getattr(module, "weight", None)
    if not isinstance(module, nn.Linear) or w is None or not w.dtype.is_floating_point or w.dim() != 2:
        raise UsageError(f"loldu: {name} is not a dense floating-point nn.Linear ({type(module).__name__}); "
                         f"LoLDU needs the weight itself (quantized bases are not supported)")
    if rank > min(w.shape):
        raise UsageError(f"loldu: rank {rank} is larger than {name} ({w.shape[0]}x{w.shape[1]}) allows")
    return module


def attach(model, spec: AdapterSpec):
    """Replace each target ``nn.Linear`` by a LoLDULinear; freeze everything but the z vectors. Returns model.

    All factors are computed (and every pivot checked) before any layer is changed.
    """
    if not spec.targets:
        raise UsageError("loldu: no target modules")
    if spec.rank < 1 or spec.alpha <= 0:
        raise UsageError(f"loldu: rank must be >= 1 and alpha > 0 (got rank {spec.rank}, alpha {spec.alpha})")
    modules = {name: _target(model, name, spec.rank) for name in spec.targets}
    ptrs = [p.data_ptr() for _, p in model.named_parameters(remove_duplicate=False)]
    for name, mod in modules.items():
        if ptrs.count(mod.weight.data_ptr()) > 1:  # the exported LoRA adapter would not be portable on a tied weight
            raise UsageError(f"loldu: {name}'s weight is tied to another parameter; leave it out of --targets")
    factors = {name: ldu_factors(mod.weight, spec.rank, name=name) for name, mod in modules.items()}
    sigma = spec.alpha / spec.rank
    model.requires_grad_(False)
    for name, mod in modules.items():
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, LoLDULinear.install(mod, *factors[name], sigma=sigma, dropout=spec.dropout))
    return model


class _DecayTowardsInit:
    """Decoupled weight decay of (z - D_r) before each AdamW step (decaying z itself would erase W0's part)."""

    def __init__(self, pairs):
        self.pairs = pairs

    def __call__(self, opt, args, kwargs):
        with torch.no_grad():
            for group in opt.param_groups:
                rate = group["lr"] * group.get("loldu_weight_decay", 0.0)
                if rate:
                    for p in group["params"]:
                        d = self.pairs.get(id(p))
                        if d is not None and p.grad is not None:
                            p.sub_(p - d, alpha=rate)


def optimizer(model, spec: AdapterSpec, *, lr: float, weight_decay: float = 0.0, betas=(0.9, 0.999),
              eps: float = 1e-8):
    """AdamW on the z vectors (recommended lr 1e-3 .. 1e-2); weight decay pulls z towards D_r."""
    layers = loldu_layers(model)
    if not layers:
        raise UsageError("loldu: the model has no LoLDU layers (call attach first)")
    zs = [m.z for m in layers.values()]
    opt = torch.optim.AdamW([{"params": zs, "loldu_weight_decay": weight_decay}], lr=lr, betas=betas, eps=eps,
                            weight_decay=0.0)
    opt.register_step_pre_hook(_DecayTowardsInit({id(m.z): m.d for m in layers.values()}))
    return opt


def lora_export(model) -> tuple[dict[str, torch.Tensor], list[str], int]:
    """PEFT adapter tensors (keys as ``save_pretrained`` writes them), target names, and the rank."""
    layers = loldu_layers(model)
    if not layers:
        raise UsageError("loldu: the model has no LoLDU layers to export")
    ranks = {m.rank for m in layers.values()}
    if len(ranks) != 1:  # pragma: no cover - attach uses one rank for every layer
        raise RuntimeError(f"loldu: layers have different ranks {sorted(ranks)}")
    tensors = {}
    for name, layer in layers.items():
        a, b = layer.lora_factors()
        tensors[f"base_model.model.{name}.lora_A.weight"] = a.cpu().contiguous()
        tensors[f"base_model.model.{name}.lora_B.weight"] = b.cpu().contiguous()
    return tensors, sorted(layers), ranks.pop()


def save(model, folder: Path, spec: AdapterSpec, *, base_name_or_path: str | None = None) -> None:
    """A standard PEFT LoRA adapter on the unmodified base (lora_alpha = r: scaling 1) plus ``loldu.json``."""
    from peft import LoraConfig
    from safetensors.torch import save_file

    folder = Path(folder)
    tensors, names, rank = lora_export(model)
    config = LoraConfig(r=rank, lora_alpha=rank, lora_dropout=0.0, target_modules=names, bias="none",
                        task_type="CAUSAL_LM", base_model_name_or_path=base_name_or_path)
    config.save_pretrained(str(folder))
    save_file(tensors, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
    layers = loldu_layers(model)
    meta = {
        "method": "loldu", "rank": rank, "alpha": spec.alpha, "sigma": spec.alpha / rank, "init": "lu",
        "export": "lora_A = U_r, lora_B = sigma * P L_r diag(z - D_r), lora_alpha = r (scaling 1), on W0",
        "layers": {
            name: {"shape": [layer.out_features, layer.in_features], "z": layer.z.detach().cpu().tolist(),
                   "d": layer.d.cpu().tolist(), "min_abs_pivot": float(layer.d.abs().min()),
                   "max_abs_update": float((layer.z.detach() - layer.d).abs().max())}
            for name, layer in layers.items()
        },
    }
    (folder / "loldu.json").write_text(json.dumps(meta, indent=1) + "\n", encoding="utf-8")
