"""How much the model's loss cares about error in each layer's output: one streamed backward pass.

A rank-r factorization perturbs a layer's outputs by dy_t = (W - W') x_t. To second order, with the
empirical Fisher standing in for the Hessian, the summed loss grows by

    dL ~ 1/2 sum_t (g_t . dy_t)^2  ~  1/2 (mean_t |g_t|^2 / m) * sum_t |dy_t|^2  =  1/2 s * tail(r)

where g_t = dLoss_t/dy_t and the second step treats the error direction as uncorrelated with the gradient.
`tail(r)` is exactly what the LoRD spectrum gives per rank, so s (one scalar per layer) turns every
layer's error curve into one currency — estimated loss — and rank allocation can trade parameters across
layers of different kinds and depths. Relative output error (the naive choice) ignores that an error in
an early value projection and the same error in a late MLP cost the model very different amounts.

The backward pass runs block by block in reverse from the stored block-boundary hidden states, so memory
stays at one block plus the activations, like the forward passes.
"""

from __future__ import annotations

import torch

from lowrank_cli.engine.activations import Activations
from lowrank_cli.methods.decompose.targets import Target

__all__ = ["output_sensitivities"]


def output_sensitivities(streamed, calib, boundaries: list[Activations], targets: list[Target],
                         batch_size: int, progress=None) -> dict[str, float]:
    """s per target: mean over calibration tokens of |dLoss_t/dy|^2 / m (see the module docstring)."""
    from lowrank_cli.eval.perplexity import next_token_loss

    sq: dict[str, float] = {t.name: 0.0 for t in targets}
    tokens = 0
    grads: list[torch.Tensor] = []
    final = boundaries[-1]
    with streamed._outer_loaded():
        for b, hidden in enumerate(final):
            ids = calib[b * batch_size:(b + 1) * batch_size].to(streamed.device)
            h = hidden.detach().requires_grad_(True)
            with torch.enable_grad():
                logits = streamed.head_logits(h, ids)
                # summed per-token losses: g_t is then the gradient of token t's own loss
                loss = next_token_loss(logits, ids)
                (g,) = torch.autograd.grad(loss, h)
            grads.append(g.detach())
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
            with torch.enable_grad():
                out = block(x, *args, **kwargs)
                out = out[0] if isinstance(out, tuple) else out
                (gx,) = torch.autograd.grad(out, x, grad_outputs=grads[b])
            new_grads.append(gx.detach())
        for h in handles:
            h.remove()
        grads = new_grads
        streamed.free_block(i)
        if progress:
            progress()
    return {t.name: sq[t.name] / max(tokens, 1) / t.m for t in targets}


def _grad_probe(t: Target, sink: dict[str, float]):
    def hook(module, inputs, output):
        if output.requires_grad:
            def record(grad):
                # only next-token-predicting positions carry loss; the last position's grad is zero anyway
                sink[t.name] += float(grad.double().pow(2).sum())
            output.register_hook(record)

    return hook
