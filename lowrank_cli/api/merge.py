"""`lowrank merge`: fold a PEFT adapter into its base checkpoint, and/or multiply a factorized checkpoint's
factors back into dense weights.

Everything that can be wrong with the inputs (no adapter, an adapter for another base, a quantized base, an
output inside an input) is checked from configs and tensor headers before anything is read or written.
The merge itself streams the base tensor by tensor (see `merge_flow`), so memory holds one tensor (two for a
factor pair with --dense) plus the adapter.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from lowrank_cli.api.common import with_overrides
from lowrank_cli.api.merge_flow import MergeResult
from lowrank_cli.api.options.merge import MergeOptions
from lowrank_cli.errors import UsageError
from lowrank_cli.io.checkpoint import Checkpoint, read_header
from lowrank_cli.io.output import check_output_target
from lowrank_cli.io.resolve import resolve_model
from lowrank_cli.utils.progress import Progress

__all__ = ["MergeOptions", "MergeResult", "Adapter", "read_adapter", "merge"]

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")


@dataclass
class Adapter:
    path: Path
    config: dict
    shapes: dict[str, tuple]
    weights: Path
    _state: dict | None = field(default=None, repr=False)

    def tensors(self, keys):
        """The named adapter tensors (read on demand from safetensors; a .bin adapter is read whole)."""
        if self.weights.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(self.weights), framework="pt") as fh:
                return [fh.get_tensor(k) for k in keys]
        if self._state is None:
            self._state = _load_bin(self.weights)
        return [self._state[k] for k in keys]


def _load_bin(path: Path) -> dict:
    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle errors of many kinds
        raise UsageError(f"cannot read adapter weights '{path}' ({type(exc).__name__})") from exc


def read_adapter(spec: str) -> Adapter:
    """A PEFT adapter folder: adapter_config.json (with peft_type) + adapter_model.safetensors (or .bin)."""
    path = Path(spec).expanduser()
    if not path.is_dir():
        raise UsageError(f"adapter '{spec}' is not a folder")
    cfg_file = path / ADAPTER_CONFIG
    weights = next((path / w for w in ADAPTER_WEIGHTS if (path / w).is_file()), None)
    if not cfg_file.is_file() or weights is None:
        raise UsageError(f"'{spec}' is not a PEFT adapter folder (needs {ADAPTER_CONFIG} and "
                         f"{ADAPTER_WEIGHTS[0]})")
    try:
        config = json.loads(cfg_file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise UsageError(f"cannot read '{cfg_file}': {exc}") from exc
    if not isinstance(config, dict) or "peft_type" not in config:
        raise UsageError(f"'{cfg_file}' is not a PEFT adapter config (no peft_type)")
    if weights.suffix == ".safetensors":
        header = read_header(weights)
        shapes = {k: tuple(v["shape"]) for k, v in header.items() if k != "__metadata__"}
    else:
        shapes = {k: tuple(v.shape) for k, v in _load_bin(weights).items()}
    return Adapter(path.resolve(), config, shapes, weights)


def _base_format(ckpt: Checkpoint) -> str:
    from lowrank_cli.io.gptq_view import is_gptq
    from lowrank_cli.modeling.export import is_factorized

    if ckpt.quantization:
        return "gptq" if is_gptq(ckpt.config) else "quantized"
    return "factorized" if is_factorized(ckpt.config) else "dense"


def merge(model: str, opts: MergeOptions | None = None, progress: Progress | None = None,
          **overrides) -> MergeResult:
    """Merge an adapter into MODEL and/or densify a factorized MODEL; see MergeOptions. UsageError = exit 2."""
    from lowrank_cli.api import merge_flow
    from lowrank_cli.methods.merge.plan import plan_folds
    from lowrank_cli.modeling.export import ranks_of

    opts = with_overrides(opts or MergeOptions(), overrides)
    opts.validate()
    path = resolve_model(model)
    adapter = read_adapter(opts.adapter) if opts.adapter else None
    inputs = [path] + ([adapter.path] if adapter else [])
    check_output_target(opts.output, overwrite=opts.overwrite, inputs=inputs)
    ckpt = Checkpoint(path)
    base_format = _base_format(ckpt)
    if base_format == "quantized" or (base_format == "gptq" and not opts.requantize):
        method = ckpt.quantization.get("quant_method", "?")
        how = ("pass --requantize to dequantize, merge and quantize again with the base's bits and group size"
               if base_format == "gptq" else "merge into the full-precision checkpoint, then quantize the result")
        raise UsageError(f"'{model}' is quantized ({method}): an adapter cannot be added to packed integer "
                         f"weights; {how}")
    if opts.requantize and base_format != "gptq":
        raise UsageError(f"--requantize: '{model}' is not a GPTQ checkpoint")
    if base_format == "gptq":
        from lowrank_cli.io.gptq_view import DequantizedCheckpoint

        ckpt = DequantizedCheckpoint(ckpt)
    ranks = ranks_of(ckpt.config)
    if opts.dense and base_format != "factorized":
        raise UsageError(f"--dense: '{model}' is not a factorized checkpoint (no lowrank section in its config)")
    folds = []
    if adapter is not None:
        base_shapes = {name: info.shape for name, info in ckpt.tensors.items()}
        folds = plan_folds(adapter.config, adapter.shapes, base_shapes, set(ranks))
    if base_format == "gptq":
        return merge_flow.run_requantize(model, path, ckpt, adapter, folds, opts, progress or Progress())
    return merge_flow.run(model, path, ckpt, adapter, folds, base_format, opts, progress or Progress())
