"""The precision of the passes that only steer the rank allocation (the Fisher sensitivity pass).

Those passes decide *which* layer gets which rank; they never produce a written weight or a reported
perplexity. Their output is an estimate whose own window-to-window noise is about 30% (SmolLM2, 512-token
windows), so bfloat16 products (about 0.4% relative rounding, summed in float32) change nothing that matters:
measured on SmolLM2, the 210 sensitivities of a bfloat16-autocast pass agreed with float32's to a median of
0.11% and at most 0.80%. Where the hardware multiplies bfloat16 fast (CPU AMX-BF16 or AVX512-BF16, a CUDA
device with bfloat16) the pass runs about 1.4x faster (SmolLM2 on a 2-core Xeon with AMX: 28.5 s -> 20.0 s).
Elsewhere bfloat16 is emulated and slower, so "auto" keeps float32.

torch is imported inside the functions: the option's choices are read by `--help`, which must not load it.
"""

from __future__ import annotations

__all__ = ["STEERING_CHOICES", "fast_bfloat16", "steering_dtype", "autocast", "dtype_name"]

STEERING_CHOICES = ("auto", "float32", "bfloat16")


def fast_bfloat16(device: str) -> bool:
    """Whether `device` multiplies bfloat16 faster than float32: a CUDA device with bfloat16 support, or a
    CPU with AMX-BF16 tiles or AVX512-BF16 instructions (torch's checks are private: absent -> False)."""
    import torch

    if str(device).startswith("cuda"):
        return bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())
    cpu = getattr(torch, "cpu", None)
    for probe in ("_is_amx_tile_supported", "_is_avx512_bf16_supported"):
        check = getattr(cpu, probe, None)
        try:
            if check is not None and check():
                return True
        except Exception:  # a private probe that fails on this build answers "no"
            continue
    return False


def steering_dtype(choice: str, device: str, compute_dtype):
    """The autocast dtype for a steering pass, or None for none (the pass runs in the compute dtype).

    choice "auto": bfloat16 when the compute dtype is float32 and `device` multiplies bfloat16 fast (a
    compute dtype that is already 16-bit needs no autocast); "bfloat16": always; "float32": never.
    """
    import torch

    if choice == "float32":
        return None
    if choice == "bfloat16":
        return torch.bfloat16
    if choice != "auto":
        raise ValueError(f"unknown steering precision '{choice}' (choose {', '.join(STEERING_CHOICES)})")
    if compute_dtype == torch.float32 and fast_bfloat16(device):
        return torch.bfloat16
    return None


def autocast(device, dtype):
    """torch.autocast on `device`'s type in `dtype`; a no-op context for None."""
    import contextlib

    import torch

    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=dtype)


def dtype_name(dtype) -> str:
    """torch.bfloat16 -> 'bfloat16'."""
    return str(dtype).replace("torch.", "")
