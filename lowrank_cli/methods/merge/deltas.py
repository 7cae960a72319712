"""The weight change each supported PEFT adapter type adds to its base weight, as PEFT's own merge computes it.

All functions take and return tensors; the caller picks the compute dtype (float32 for half-precision
bases, as PEFT does on CPU). Shapes follow the nn.Linear convention W: out x in unless noted.

- LoRA (PEFT `tuners/lora/layer.py`): dW = s * B @ A with s = alpha / r, or alpha / sqrt(r) with rsLoRA;
  transposed for fan_in_fan_out layers (GPT-2 Conv1D stores in x out); embeddings use
  lora_embedding_A (r x vocab) / lora_embedding_B (dim x r) and dW = s * (B @ A)^T (vocab x dim).
  LoRA-Pro and LoLDU adapters are exported as plain LoRA, so they fold here too.
- MiSS default ("miss", the later Bone): block D (r x out); the forward sums the r-wide input chunks
  (input zero-padded to a multiple of r) and multiplies by D, so dW = [D^T D^T ... D^T] tiled over the
  column blocks, the last partial block taking the first (in mod r) columns of D^T.
- MiSS "mini": block (r x mini_r) tiled along out to r x out, then as MiSS default.
- MiSS "bat" (Bone 2024, Block Affine): T (out/r x r x r); with W cut into r x r blocks W_ij,
  dW_ij = W_ij T_i + T_i (one T per output row-block, shared across column blocks). Needs W itself.
"""

from __future__ import annotations

import math

__all__ = ["lora_scaling", "lora_delta", "lora_embedding_delta", "miss_delta", "mini_delta", "bat_delta"]


def lora_scaling(alpha: float, r: int, rslora: bool = False) -> float:
    """PEFT's LoRA scale: alpha / r, or alpha / sqrt(r) for rsLoRA."""
    if r < 1:
        raise ValueError(f"LoRA rank must be >= 1, got {r}")
    return alpha / math.sqrt(r) if rslora else alpha / r


def lora_delta(lora_a, lora_b, scaling: float, fan_in_fan_out: bool = False):
    """s * B @ A (out x in); transposed (in x out) for fan_in_fan_out weights."""
    if lora_a.dim() != 2 or lora_b.dim() != 2 or lora_b.shape[1] != lora_a.shape[0]:
        raise ValueError(f"LoRA factors do not chain: A {tuple(lora_a.shape)}, B {tuple(lora_b.shape)}")
    delta = (lora_b @ lora_a) * scaling
    return delta.T if fan_in_fan_out else delta


def lora_embedding_delta(lora_embedding_a, lora_embedding_b, scaling: float):
    """s * (B @ A)^T: vocab x dim, the layout of an nn.Embedding weight."""
    return lora_delta(lora_embedding_a, lora_embedding_b, scaling).T


def miss_delta(block, shape):
    """dW (out x in) of a MiSS default block D (r x out): D^T in every r-wide column block."""
    out_features, in_features = shape
    r = block.shape[0]
    if block.dim() != 2 or block.shape[1] != out_features:
        raise ValueError(f"MiSS block {tuple(block.shape)} does not fit a weight of shape {tuple(shape)}")
    blocks = -(-in_features // r)  # ceil: the last block may be partial
    return block.T.repeat(1, blocks)[:, :in_features]


def mini_delta(block, mini_r: int, shape):
    """dW of a MiSS "mini" block (r x mini_r): tiled along out to r x out, then as `miss_delta`."""
    out_features = shape[0]
    if block.dim() != 2 or block.shape[1] != mini_r or out_features % mini_r:
        raise ValueError(f"MiSS mini block {tuple(block.shape)} (mini_r {mini_r}) does not fit {tuple(shape)}")
    return miss_delta(block.repeat(1, out_features // mini_r), shape)


def bat_delta(t, weight):
    """dW (out x in) of MiSS "bat" T (out/r x r x r) on weight W: dW_ij = W_ij T_i + T_i."""
    out_features, in_features = weight.shape
    r = t.shape[-1]
    if t.dim() != 3 or t.shape[1] != r or out_features % r or in_features % r or t.shape[0] != out_features // r:
        raise ValueError(f"Bat block {tuple(t.shape)} does not fit a weight of shape {tuple(weight.shape)}")
    # blocks[i, j] = W_ij (r x r): row-block i of the output, column-block j of the input
    blocks = weight.reshape(out_features // r, r, in_features // r, r).permute(0, 2, 1, 3)
    delta = blocks @ t[:, None] + t[:, None]
    return delta.permute(0, 2, 1, 3).reshape(out_features, in_features)
