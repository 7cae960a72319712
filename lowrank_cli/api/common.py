"""Pieces every job shares: tokenizer loading, evaluation/calibration windows, seeding, timing."""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from lowrank_cli.data.sources import STDLIB, STDLIB_PROSE, load_documents
from lowrank_cli.data.windows import windows_from_documents
from lowrank_cli.errors import UsageError

__all__ = ["load_tokenizer", "text_windows", "Timer", "check_device", "with_overrides",
           "calibration_and_eval_windows", "SolverWindows", "solver_windows"]


def load_tokenizer(path: Path):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path))
    except Exception as exc:  # missing/corrupt tokenizer files raise many types
        raise UsageError(f"cannot load a tokenizer from '{path}' ({type(exc).__name__}); "
                         "the checkpoint folder needs its tokenizer files") from exc


def text_windows(tokenizer, spec: str | None, *, part: str, seq_len: int, max_tokens: int,
                 seed: int, text_field: str = "text", same_source_as: str | None = "unset"):
    """[n, seq_len] windows from a data spec.

    The stdlib sources always use the requested part of their disjoint split. A user's own source is
    used whole, unless the same source also feeds the other role (calibration vs evaluation): then
    its documents are split by the same stable hash, so the two never overlap.
    """
    builtin = spec in (None, STDLIB, STDLIB_PROSE)
    split = builtin or (same_source_as != "unset" and same_source_as == spec)
    docs = load_documents(spec, part=part if split else None, text_field=text_field)
    what = f"{part} data '{spec or STDLIB}'"
    return windows_from_documents(tokenizer, docs, seq_len=seq_len, max_tokens=max_tokens, seed=seed,
                                  what=what)


def calibration_and_eval_windows(tokenizer, opts):
    """(calibration, evaluation) windows of a solver run (decompose, quantize) from the options it shares:
    calib, calib_samples, calib_seq_len, eval_data, eval_tokens, seed, text_field. The two never overlap."""
    calib = text_windows(tokenizer, opts.calib, part="calib", seq_len=opts.calib_seq_len,
                         max_tokens=opts.calib_samples * opts.calib_seq_len, seed=opts.seed,
                         text_field=opts.text_field, same_source_as=opts.eval_data)
    evalw = text_windows(tokenizer, opts.eval_data, part="eval", seq_len=opts.calib_seq_len,
                         max_tokens=opts.eval_tokens, seed=opts.seed, text_field=opts.text_field,
                         same_source_as=opts.calib)
    return calib, evalw


@dataclass
class SolverWindows:
    """The three disjoint parts of a solver's text: calibration (the solve), eval (what a search may look
    at) and test (what is reported)."""

    calib: object
    eval: object
    test: object


def solver_windows(tokenizer, opts) -> SolverWindows:
    """Calibration, eval and test windows. Interim: test = the windows after eval's in the eval part."""
    import dataclasses

    test_tokens = getattr(opts, "test_tokens", opts.eval_tokens)
    wide = dataclasses.replace(opts, eval_tokens=opts.eval_tokens + test_tokens)
    calib, both = calibration_and_eval_windows(tokenizer, wide)
    n_eval = max(1, opts.eval_tokens // opts.calib_seq_len)
    return SolverWindows(calib, both[:n_eval], both[n_eval:] if both.shape[0] > n_eval else both[:n_eval])


def check_device(device: str) -> str:
    import torch

    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UsageError(f"--device {device}: no CUDA device is available here")
        index = int(device.split(":", 1)[1]) if ":" in device else 0
        if index >= torch.cuda.device_count():
            raise UsageError(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s)")
    elif device != "cpu":
        raise UsageError(f"unknown --device '{device}' (cpu, cuda or cuda:N)")
    return device



class Timer:
    """Named wall-clock sections: `with timer("calibrate"): ...`; `timer.seconds` -> {name: s}."""

    def __init__(self):
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = round(self.seconds.get(name, 0.0) + time.perf_counter() - start, 3)


def with_overrides(opts, overrides: dict):
    """`opts` (an options dataclass) with keyword overrides applied: `decompose(model, params_ratio=0.8)`.
    An unknown name is a programming error (TypeError), not a user's."""
    for key, value in overrides.items():
        if not hasattr(opts, key):
            raise TypeError(f"unknown option {key}")
        setattr(opts, key, value)
    return opts
