"""A GPTQ checkpoint read as if it were dense: every `X.qweight` (+ qzeros, scales, g_idx) appears as one
float `X.weight`, dequantized on demand. Lets the streaming engine, `lowrank eval` and the loader run a
quantized folder with no GPTQ kernel library installed."""

from __future__ import annotations

from lowrank_cli.errors import UsageError
from lowrank_cli.io.checkpoint import Checkpoint, TensorInfo

__all__ = ["DequantizedCheckpoint", "is_gptq", "dequantizing", "correction_folder", "CORRECTION_DIR"]

_PARTS = ("qweight", "qzeros", "scales", "g_idx")


def is_gptq(config: dict) -> bool:
    qc = config.get("quantization_config") or {}
    return qc.get("quant_method") == "gptq"


class DequantizedCheckpoint:
    """Same reading interface as Checkpoint (`tensors`, `get`, `names`, `in`, ...) over a GPTQ folder."""

    def __init__(self, ckpt: Checkpoint):
        qc = ckpt.quantization or {}
        if qc.get("quant_method") != "gptq":
            raise UsageError(f"'{ckpt.path}' is not a GPTQ checkpoint")
        fmt = qc.get("checkpoint_format", qc.get("format", "gptq"))
        if fmt not in ("gptq", None):
            raise UsageError(f"'{ckpt.path}': GPTQ checkpoint format '{fmt}' is not supported (only 'gptq' v1)")
        self.base = ckpt
        self.bits, self.group_size = int(qc.get("bits", 4)), int(qc.get("group_size", 128))
        self.sym = bool(qc.get("sym", True))
        self.layers = sorted(n[: -len(".qweight")] for n in ckpt.tensors if n.endswith(".qweight"))
        for layer in self.layers:
            missing = [p for p in _PARTS[1:3] if f"{layer}.{p}" not in ckpt.tensors]
            if missing:
                raise UsageError(f"'{ckpt.path}': GPTQ layer '{layer}' has no {' or '.join(missing)}")
        hidden = {f"{layer}.{part}" for layer in self.layers for part in _PARTS}
        self.tensors = {n: info for n, info in ckpt.tensors.items() if n not in hidden}
        for layer in self.layers:
            q = ckpt.tensors[f"{layer}.qweight"]
            n_in, n_out = q.shape[0] * 32 // self.bits, q.shape[1]
            self.tensors[f"{layer}.weight"] = TensorInfo(f"{layer}.weight", "F16", [n_out, n_in], q.file,
                                                         n_out * n_in * 2)
        self._layer_of = {f"{layer}.weight": layer for layer in self.layers}
        self.corrections = _corrections(ckpt.path)

    def __getattr__(self, name):  # path, config, files, close, side_files, fingerprint, ...
        return getattr(self.base, name)

    # Checkpoint's own readers of `self.tensors`, applied to the dense view's table
    __contains__ = Checkpoint.__contains__
    names = Checkpoint.names
    num_params = Checkpoint.num_params

    @property
    def quantization(self):
        return None  # what this view serves is dense

    def get(self, name: str, dtype=None, device=None):
        import torch

        from lowrank_cli.methods.quantize.packing import unpack

        layer = self._layer_of.get(name)
        if layer is None:
            return self.base.get(name, dtype=dtype, device=device)
        parts = {p: self.base.get(f"{layer}.{p}") for p in _PARTS if f"{layer}.{p}" in self.base}
        weight = unpack(parts, self.bits, self.group_size, self.sym).dequantize()
        if layer in self.corrections:  # GPTQ + low-rank correction (compress's gptq-lr): W = Q + L R
            up, down = self.corrections[layer]
            weight = weight + up.double() @ down.double()
        weight = weight.to(dtype or torch.float16)
        return weight.to(device) if device is not None else weight


CORRECTION_DIR = "correction"  # where compress stores a GPTQ checkpoint's low-rank correction (PEFT LoRA)


def correction_folder(path):
    """The folder's low-rank correction adapter, or None."""
    from pathlib import Path

    folder = Path(path) / CORRECTION_DIR
    return folder if (folder / "adapter_config.json").is_file() else None


def _corrections(path) -> dict:
    folder = correction_folder(path)
    if folder is None:
        return {}
    from lowrank_cli.io.lora_adapter import read_lora_adapter

    return read_lora_adapter(folder)


def dequantizing(ckpt: Checkpoint):
    """`ckpt` itself, or its dense view when it is a GPTQ checkpoint."""
    return DequantizedCheckpoint(ckpt) if is_gptq(ckpt.config) else ckpt
