"""How much the model's loss cares about error in each layer's output: one streamed backward pass.

A rank-r factorization perturbs a layer's outputs by dy_t = (W - W') x_t. To second order, with the
empirical Fisher standing in for the Hessian, the summed loss grows by

    dL ~ 1/2 sum_t (g_t . dy_t)^2  ~  1/2 (mean_t |g_t|^2 / m) * sum_t |dy_t|^2  =  1/2 s * tail(r)

where g_t = dLoss_t/dy_t and the second step treats the error direction as uncorrelated with the gradient.
`tail(r)` is exactly what the LoRD spectrum gives per rank, so s (one scalar per layer) turns every
layer's error curve into one currency — estimated loss — and rank allocation can trade parameters across
layers of different kinds and depths. Relative output error (the naive choice) ignores that an error in
an early value projection and the same error in a late MLP cost the model very different amounts.
(This allocation is this project's addition; LoRD itself picks one rank for every layer.)

The backward pass runs block by block in reverse from the stored block-boundary hidden states, so memory
stays at one block plus the activations, like the forward passes.

The LM head (cost independent of the blocks, large for big vocabularies: 262k entries on Gemma 3) is not
differentiated by autograd. The gradient of the summed next-token loss with respect to the head's input z
is computed by hand in token chunks: logits = z W^T (+ b, + the model's final-logit soft-capping when its
config sets one), softmax, minus the one-hot target, times W. Per token that is the head's forward matmul
and the one matmul back to z (the least an exact gradient needs; never a gradient for the head weight), and
logits exist for one chunk (``CHUNK_LOGITS`` values) at a time. Autograd through the head did the same two
matmuls but held the whole batch's float32 logits, their log-softmax and its gradient at once (three
batch x seq x vocabulary tensors: 1.6 GB for 512 tokens of a 262k vocabulary), which is what made the head
dominate (measured: `benchmarks/sensitivity_head.py`). Only the final norm between the last block and the
head goes through autograd. On the first batch the hand-made logits are checked against the model's own
on a few positions; a model whose head does something else (a logit scale, ...) falls back to autograd
through the head, with a log line.

Precision: the pass only steers the allocation, so it may run its matrix products in bfloat16 (`autocast`,
chosen by `lowrank_cli.engine.precision.steering_dtype`): each block's forward and input backward under
torch.autocast, and the head's two chunked matmuls on a bfloat16 copy of the head weight (softmax, soft-capping
and the sums stay float32). The check against the model's own logits always runs in the compute dtype.
"""

from __future__ import annotations

import logging

import torch

from lowrank_cli.engine.activations import Activations
from lowrank_cli.engine.precision import autocast as steering_autocast
from lowrank_cli.methods.decompose.targets import Target

__all__ = ["output_sensitivities"]

log = logging.getLogger("lowrank")


def output_sensitivities(streamed, calib, boundaries: list[Activations], targets: list[Target],
                         batch_size: int, progress=None, autocast: torch.dtype | None = None) -> dict[str, float]:
    """s per target: mean over calibration tokens of |dLoss_t/dy|^2 / m (see the module docstring).
    `autocast`: the dtype the matrix products run in (None: the model's compute dtype)."""
    sq: dict[str, float] = {t.name: 0.0 for t in targets}
    tokens = 0
    grads: list[torch.Tensor] = []
    final = boundaries[-1]
    with streamed._outer_loaded():
        head = _HeadGradient(streamed, matmul_dtype=autocast)
        for b, hidden in enumerate(final):
            ids = calib[b * batch_size:(b + 1) * batch_size].to(streamed.device)
            grads.append(head.hidden_grad(hidden, ids))
            tokens += ids[:, 1:].numel()
    by_block: dict[int, list[Target]] = {}
    for t in targets:
        by_block.setdefault(t.block, []).append(t)
    for i in reversed(range(streamed.num_blocks)):
        block = streamed.load_block(i)
        for p in block.parameters():
            p.requires_grad_(False)
        mine = by_block.get(i, [])
        handles = [block.get_submodule(t.local).register_forward_hook(_grad_probe(t, sq)) for t in mine]
        inputs = boundaries[i]
        new_grads = []
        for b, x in enumerate(inputs):
            args, kwargs = inputs.calls[i][b]
            x = x.detach().requires_grad_(True)
            with torch.enable_grad(), steering_autocast(streamed.device, autocast):
                out = block(x, *args, **kwargs)
                out = out[0] if isinstance(out, tuple) else out
                (gx,) = torch.autograd.grad(out, x, grad_outputs=grads[b].to(out.dtype))
            new_grads.append(gx.detach())
        for h in handles:
            h.remove()
        grads = new_grads
        streamed.free_block(i)
        if progress:
            progress()
    return {t.name: sq[t.name] / max(tokens, 1) / t.m for t in targets}


CHUNK_LOGITS = 1 << 22  # logits held at once (16 MB in float32): tokens per chunk = this / vocabulary


class _Capture(torch.nn.Module):
    """Stands in for the LM head: records its input z (and passes it on, so the forward completes)."""

    def forward(self, z):
        self.z = z
        return z


class _HeadGradient:
    """dLoss/dh of the final hidden states h for one batch, the head's part by hand (module docstring)."""

    def __init__(self, streamed, matmul_dtype: torch.dtype | None = None):
        self.streamed = streamed
        self.matmul_dtype = matmul_dtype
        self._matmul_weight = None
        self.model = streamed.model
        self.head = self.model.get_output_embeddings()
        config = getattr(self.model.config, "get_text_config", lambda: self.model.config)()
        self.softcap = getattr(config, "final_logit_softcapping", None)
        self.by_hand = isinstance(self.head, torch.nn.Linear)
        self.checked = False

    def _head_name(self) -> str:
        return next(n for n, m in self.model.named_modules() if m is self.head)

    def _head_input(self, h, ids):
        """z = what the head receives for hidden states h (final norm etc. by autograd)."""
        name = self._head_name()
        parent_name, _, child = name.rpartition(".")
        parent = self.model.get_submodule(parent_name) if parent_name else self.model
        capture = _Capture()
        setattr(parent, child, capture)
        try:
            self.streamed.head_logits(h, ids)
        finally:
            setattr(parent, child, self.head)
        return capture.z

    def _weight(self):
        """The head weight the chunked matmuls use: a copy in `matmul_dtype` (made once: the head is the
        largest matrix, and casting it per batch would cost a pass over it each time), else the weight."""
        weight = self.head.weight
        if self.matmul_dtype is None or weight.dtype == self.matmul_dtype:
            return weight
        if self._matmul_weight is None:
            self._matmul_weight = weight.detach().to(self.matmul_dtype)
        return self._matmul_weight

    def _logits(self, z, weight=None):
        """The head's logits for z (tokens x d) in float32, and tanh of the soft-capped ones (or None).
        `weight`: the head weight in the dtype the product runs in (default: the head's own)."""
        weight = self.head.weight if weight is None else weight
        logits = (z.to(weight.dtype) @ weight.T).float()
        if self.head.bias is not None:
            logits = logits + self.head.bias.float()
        if not self.softcap:
            return logits, None
        t = torch.tanh(logits / self.softcap)
        return t * self.softcap, t

    def _check(self, h, ids, z) -> bool:
        """The hand-made logits equal the model's own on a few positions of the first sequence."""
        k = min(8, ids.shape[1])
        with torch.no_grad():
            want = self.streamed.head_logits(h[:1, :k].detach(), ids[:1, :k]).float()
            got, _ = self._logits(z[:1, :k].detach().reshape(k, -1))
        scale = float(want.abs().max()) or 1.0
        return bool(torch.allclose(got.reshape(want.shape), want, rtol=1e-3, atol=1e-4 * scale))

    def hidden_grad(self, hidden, ids):
        h = hidden.detach().requires_grad_(True)
        with torch.enable_grad():
            z = self._head_input(h, ids) if self.by_hand else None
            if self.by_hand and not self.checked:
                self.checked = True
                self.by_hand = self._check(h, ids, z)
                if not self.by_hand:
                    log.info("sensitivity: the LM head is not a plain linear map of its input here; "
                             "differentiating it with autograd")
            if not self.by_hand:
                from lowrank_cli.eval.perplexity import next_token_loss

                loss = next_token_loss(self.streamed.head_logits(h, ids), ids)
                (g,) = torch.autograd.grad(loss, h)
                return g.detach()
            gz = self._head_input_grad(z.detach(), ids)
            if not z.requires_grad:  # no norm between the blocks and the head: z is h
                return gz
            (g,) = torch.autograd.grad(z, h, grad_outputs=gz)
        return g.detach()

    @torch.no_grad()
    def _head_input_grad(self, z, ids):
        """d(summed next-token NLL)/dz in chunks: (softmax(logits) - onehot(target)) W per token; the last
        position predicts nothing (zero)."""
        batch, seq, d = z.shape
        weight = self._weight()
        flat = z[:, :-1].reshape(-1, d)
        target = ids[:, 1:].reshape(-1)
        out = torch.zeros_like(z)
        grads = torch.empty_like(flat)
        chunk = max(1, CHUNK_LOGITS // weight.shape[0])
        for start in range(0, flat.shape[0], chunk):
            logits, t = self._logits(flat[start:start + chunk], weight)
            p = torch.softmax(logits, dim=-1)
            p[torch.arange(p.shape[0], device=p.device), target[start:start + chunk]] -= 1.0
            if t is not None:  # d(cap * tanh(l / cap))/dl = 1 - tanh^2
                p.mul_(1.0 - t * t)
            grads[start:start + chunk] = (p.to(weight.dtype) @ weight).to(grads.dtype)
        out[:, :-1] = grads.reshape(batch, seq - 1, d)
        return out


def _grad_probe(t: Target, sink: dict[str, float]):
    def hook(module, inputs, output):
        if output.requires_grad:
            def record(grad):
                # only next-token-predicting positions carry loss; the last position's grad is zero anyway
                sink[t.name] += _square_sum(grad)
            output.register_hook(record)

    return hook


def _square_sum(grad: torch.Tensor) -> float:
    """|grad|^2 as one float32 dot product. Its float32 partial sums are off by about 1e-7 to 6e-6
    (relative) at 0.8M entries and 6e-5 at 33M (measured), far below the estimate's ~30% noise; the float64
    square-and-sum it replaces took 25x as long on a float32 gradient."""
    flat = grad.reshape(-1).float()
    return float(torch.dot(flat, flat))
