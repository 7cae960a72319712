"""TRP as a training-loop callback (see `lowrank_cli.train.callbacks` for when each hook runs).

Every `period` optimizer steps (steps 0, period, 2 period, ...):
  on_step_start             each targeted weight W <- U_k S_k V_k^T at its energy rank, so this step's forward
                            and backward run on the low-rank weights and the update is applied to them;
  on_before_optimizer_step  grad += nuclear_weight * U_k V_k^T (the nuclear-norm sub-gradient at the
                            truncated weight, from the same SVD; nothing between TRP steps, as in the paper).
Between TRP steps training is ordinary and the weights may regain rank. The sub-gradient is added before
gradient clipping, so the clip sees it. The period counts optimizer steps over the whole run (the official
code counts batches within each epoch), so it does not restart each epoch and survives a resume.

Targets are held as module references, so the model the loop passes (possibly wrapped for DDP) is not
searched by name. Conv2d targets use the channel-wise N x (C kh kw) view. Under FSDP/ZeRO-3 a weight is
sharded and cannot be truncated here: single process or DDP only.
"""

from __future__ import annotations

import time

from lowrank_cli.methods.trp.svd import SVD_METHODS, nuclear_subgradient, project, truncated_svd
from lowrank_cli.train.callbacks import Callback

__all__ = ["TRPCallback"]


class TRPCallback(Callback):
    """Periodic truncation + nuclear sub-gradient on `targets` ([(name, nn.Linear | nn.Conv2d)])."""

    def __init__(self, targets, *, period: int = 5, energy: float = 0.9, nuclear_weight: float = 0.0,
                 svd_method: str = "auto", seed: int = 0):
        if period < 1:
            raise ValueError(f"period must be >= 1, got {period}")
        if not 0 < energy <= 1:
            raise ValueError(f"energy must be in (0, 1], got {energy}")
        if nuclear_weight < 0:
            raise ValueError(f"nuclear_weight must be >= 0, got {nuclear_weight}")
        if svd_method not in SVD_METHODS:
            raise ValueError(f"unknown SVD method {svd_method!r}")
        if not targets:
            raise ValueError("TRP needs at least one target layer")
        for name, module in targets:
            if getattr(module, "groups", 1) != 1:
                raise ValueError(f"{name}: grouped convolutions have no channel-wise low-rank view")
        self.targets = list(targets)
        self.period, self.energy, self.nuclear_weight = period, energy, nuclear_weight
        self.svd_method, self.seed = svd_method, seed
        self.history: list[dict] = []  # one row per TRP step: step, ranks {name: k}, seconds
        self.seconds = 0.0  # wall time of all truncations and sub-gradients
        self.last_rank: dict[str, int] = {}
        self._pending: dict[str, object] = {}

    def is_trp_step(self, step: int) -> bool:
        return step % self.period == 0

    def _sync(self) -> None:
        import torch

        if any(m.weight.is_cuda for _, m in self.targets[:1]) and torch.cuda.is_available():
            torch.cuda.synchronize()

    def on_step_start(self, model, step: int) -> None:
        import torch

        if not self.is_trp_step(step):
            return
        self._sync()
        start = time.perf_counter()
        ranks = {}
        with torch.no_grad():
            for index, (name, module) in enumerate(self.targets):
                weight = module.weight
                t = truncated_svd(weight, self.energy, method=self.svd_method, guess=self.last_rank.get(name),
                                  seed=self.seed * 1_000_003 + step * 1009 + index)
                weight.copy_(project(t, weight.shape).to(weight.dtype))
                ranks[name] = t.k
                self.last_rank[name] = t.k
                if self.nuclear_weight > 0:
                    self._pending[name] = t
        self._sync()
        seconds = time.perf_counter() - start
        self.seconds += seconds
        self.history.append({"step": step, "ranks": ranks, "seconds": round(seconds, 6)})

    def on_before_optimizer_step(self, model, step: int) -> None:
        import torch

        if not self._pending:
            return
        self._sync()
        start = time.perf_counter()
        with torch.no_grad():
            for name, module in self.targets:
                t = self._pending.get(name)
                if t is None:
                    continue
                weight = module.weight
                g = nuclear_subgradient(t, self.nuclear_weight, weight.shape).to(weight.dtype)
                if weight.grad is None:
                    weight.grad = g
                else:
                    weight.grad.add_(g.to(weight.grad.dtype))
        self._pending.clear()
        self._sync()
        seconds = time.perf_counter() - start
        self.seconds += seconds
        if self.history and self.history[-1]["step"] == step:
            self.history[-1]["seconds"] = round(self.history[-1]["seconds"] + seconds, 6)

    def on_step_end(self, model, step: int, logs: dict) -> None:
        if self.history and self.history[-1]["step"] == step:
            ranks = self.history[-1]["ranks"]
            full = sum(min(m.weight.shape[0], m.weight[0].numel()) for _, m in self.targets)
            logs["trp_rank_fraction"] = round(sum(ranks.values()) / full, 6)
            logs["trp_seconds"] = self.history[-1]["seconds"]

    def state_dict(self) -> dict:
        return {"history": [dict(h, ranks=dict(h["ranks"])) for h in self.history], "seconds": self.seconds,
                "last_rank": dict(self.last_rank)}

    def load_state_dict(self, state: dict) -> None:
        self.history = [dict(h, ranks=dict(h["ranks"])) for h in state.get("history", [])]
        self.seconds = float(state.get("seconds", 0.0))
        self.last_rank = dict(state.get("last_rank", {}))
