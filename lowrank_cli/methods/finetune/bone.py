"""Bone (Kang, arXiv 2409.15371) through PEFT's MiSS: Block Affine (``bat``, the 2024 paper) or MiSS shards.

``bat`` (``spec.bone_variant = "bat"``, default): view W (out x in) as r x r blocks W_ij (i over out/r row
blocks, j over in/r column blocks); each output row-block i owns one trainable r x r matrix T_i, shared across
its column blocks, and

    W'_ij = W_ij + (W_ij T_i + T_i) = W_ij (I + T_i) + T_i          (T = 0 at the start: W' = W)

which is the v1-v3 paper's "W + (W_block b + b)". Faithfulness verdict (checked against PEFT 0.21.2
``peft/tuners/miss/layer.py`` and the authors' JL-er/Bone ``llama/boneLinear.py``): PEFT's MiSS with
``init_weights="bat"`` is faithful. Its ``miss_block`` has shape (out/r, r, r); ``get_delta_weight`` rearranges W
to (in/r, out/r, r, r) blocks [j, i] = W_ij and returns W_ij @ T_i + T_i, exactly the authors' "Bone-col"
``rearrange(W, '(a r1) (b r2) -> b a r1 r2') @ bone + bone``; the forward adds it to W and runs ``F.linear``
(the paper's own approach: the adapted weight is materialised per call, O(out * in) extra memory, about 2x
slower than LoRA per PEFT's docs). So this module delegates to PEFT and writes nothing by hand. Two PEFT details:
``miss_dropout`` is ignored by bat (there is no input branch to drop; the paper has no dropout either) and
``r`` must divide both dimensions (checked here first, with a one-line UsageError naming the layer).

``miss`` (later paper versions "Bone"/DiSHA/MiSS; PEFT's default ``init_weights=True``): one shard D (r x out),
y = W x + (sum of the r-wide chunks of x) D; cheaper, and in % r != 0 is padded.

Authors' hyper-parameters: r 64 on all 7 projections, lr 2e-5, cosine, warmup 3%, wd 0, bf16.
"""

from __future__ import annotations

import math

from torch import nn

from lowrank_cli.errors import UsageError
from lowrank_cli.methods.finetune.lora import optimizer, save  # noqa: F401 - the same for MiSS adapters
from lowrank_cli.methods.finetune.spec import AdapterSpec

__all__ = ["attach", "optimizer", "save", "miss_config", "VARIANTS"]

VARIANTS = {"bat": "bat", "miss": True}


def _divisor_hint(dims: list[int], rank: int) -> str:
    """The rank nearest to ``rank`` that divides every target dimension (their gcd's divisors)."""
    common = math.gcd(*dims)
    near = min((k for k in range(1, common + 1) if common % k == 0), key=lambda k: (abs(k - rank), -k))
    return f"--rank {near} divides every target"


def _check_targets(model, spec: AdapterSpec) -> None:
    if spec.bone_variant not in VARIANTS:
        raise UsageError(f"unknown Bone variant {spec.bone_variant!r} (choose {' or '.join(VARIANTS)})")
    if not spec.targets:
        raise UsageError("bone: no target modules")
    if spec.rank < 1:
        raise UsageError(f"bone: rank must be >= 1, got {spec.rank}")
    dims_of = {}
    for name in spec.targets:
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise UsageError(f"bone: the model has no module {name!r}") from None
        if isinstance(getattr(module, "up", None), nn.Linear) and isinstance(getattr(module, "down", None), nn.Linear):
            raise UsageError(f"bone: {name} is factorized; target {name}.up and {name}.down instead")
        dims = (getattr(module, "out_features", None), getattr(module, "in_features", None))
        if None in dims:
            raise UsageError(f"bone: {name} is a {type(module).__name__}, not a linear layer")
        out_f, in_f = dims
        if spec.rank > in_f:
            raise UsageError(f"bone: rank {spec.rank} is larger than {name}'s input size {in_f}")
        dims_of[name] = (out_f, in_f)
    if spec.bone_variant != "bat":
        return
    for name, (out_f, in_f) in dims_of.items():
        if out_f % spec.rank or in_f % spec.rank:
            hint = _divisor_hint([d for pair in dims_of.values() for d in pair], spec.rank)
            raise UsageError(f"bone (bat): rank {spec.rank} does not divide {name} ({out_f}x{in_f}) into "
                             f"{spec.rank}x{spec.rank} blocks; {hint}")


def miss_config(spec: AdapterSpec):
    from peft import MissConfig

    return MissConfig(r=spec.rank, init_weights=VARIANTS[spec.bone_variant], target_modules=list(spec.targets),
                      miss_dropout=spec.dropout, bias="none", task_type="CAUSAL_LM")


def attach(model, spec: AdapterSpec):
    """PEFT MiSS adapters (bat or miss) on the target linears; returns the PeftModel."""
    from peft import get_peft_model

    _check_targets(model, spec)
    return get_peft_model(model, miss_config(spec))
