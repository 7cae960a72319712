"""Pieces every job shares: tokenizer loading, evaluation/calibration windows, seeding, timing."""

from __future__ import annotations

import time
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from lowrank_cli.data.sources import STDLIB, is_builtin, load_documents
from lowrank_cli.data.windows import windows_from_documents
from lowrank_cli.errors import UsageError

__all__ = ["load_tokenizer", "text_windows", "Timer", "check_device", "with_overrides",
           "calibration_and_eval_windows", "SolverWindows", "solver_windows", "check_seq_len"]


def load_tokenizer(path: Path):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path))
    except Exception as exc:  # missing/corrupt tokenizer files raise many types
        raise UsageError(f"cannot load a tokenizer from '{path}' ({type(exc).__name__}); "
                         "the checkpoint folder needs its tokenizer files") from exc


def text_windows(tokenizer, spec: str | None, *, part: str, seq_len: int, max_tokens: int,
                 seed: int, text_field: str = "text", same_source_as: str | None | Sequence = "unset"):
    """[n, seq_len] windows from a data spec.

    The built-in sources (stdlib, stdlib-prose, stdlib-mix) always use the requested part of their
    disjoint split. A user's own source is used whole, unless the same source also feeds another role
    (`same_source_as`: the other role's spec, or a list of the other roles' specs): then its documents
    are split by the same stable hash, so no document is in two roles.
    """
    others = [same_source_as] if isinstance(same_source_as, str) or same_source_as is None else same_source_as
    split = is_builtin(spec) or (same_source_as != "unset" and spec in others)
    docs = load_documents(spec, part=part if split else None, text_field=text_field)
    what = f"{part} data '{spec or STDLIB}'"
    return windows_from_documents(tokenizer, docs, seq_len=seq_len, max_tokens=max_tokens, seed=seed,
                                  what=what)


@dataclass
class SolverWindows:
    """The three disjoint token sets of a run that searches and reports: [n, seq] LongTensors each.

    calib: what the solver fits to; eval: what a search may look at (budgets are checked on it);
    test: what is reported as the result, never looked at while choosing."""

    calib: object
    eval: object
    test: object


def _role_specs(opts) -> dict[str, str | None]:
    # Test text defaults to the evaluation source (its "test" part): the reported number is then on the
    # same kind of text the budget was checked on, yet on documents the search never saw.
    test = getattr(opts, "test_data", None)
    return {"calib": opts.calib, "eval": opts.eval_data, "test": opts.eval_data if test is None else test}


def _windows_for(tokenizer, opts, role: str, specs: dict, max_tokens: int):
    others = [spec for other, spec in specs.items() if other != role]
    return text_windows(tokenizer, specs[role], part=role, seq_len=opts.calib_seq_len, max_tokens=max_tokens,
                        seed=opts.seed, text_field=opts.text_field, same_source_as=others)


def solver_windows(tokenizer, opts) -> SolverWindows:
    """Calibration, eval and test windows of a run, from its options: calib, calib_samples, calib_seq_len,
    eval_data, eval_tokens, text_field, seed, and (when the options have them) test_data (default: the
    eval source) and test_tokens (default: eval_tokens). No document is in two of them: the built-in
    sources use their calib/eval/test parts, and a source of the user's given for two roles is split."""
    specs = _role_specs(opts)
    calib = _windows_for(tokenizer, opts, "calib", specs, opts.calib_samples * opts.calib_seq_len)
    if not opts.eval_tokens:  # a run told to measure nothing (quantize --eval-tokens 0)
        return SolverWindows(calib=calib, eval=None, test=None)
    test_tokens = getattr(opts, "test_tokens", None) or opts.eval_tokens
    return SolverWindows(
        calib=calib,
        eval=_windows_for(tokenizer, opts, "eval", specs, opts.eval_tokens),
        test=_windows_for(tokenizer, opts, "test", specs, test_tokens),
    )


def calibration_and_eval_windows(tokenizer, opts):
    """(calibration, evaluation) windows of a solver run (decompose, quantize) from the options it shares:
    calib, calib_samples, calib_seq_len, eval_data, eval_tokens, seed, text_field. The two never overlap.
    (No test windows: see `solver_windows` for runs that report on held-out test text.)"""
    specs = {"calib": opts.calib, "eval": opts.eval_data}
    return (_windows_for(tokenizer, opts, "calib", specs, opts.calib_samples * opts.calib_seq_len),
            _windows_for(tokenizer, opts, "eval", specs, opts.eval_tokens))


def check_seq_len(ckpt, seq_len: int) -> None:
    """Windows longer than the model's positions would index past its position table: refuse them."""
    if ckpt.max_positions is not None and seq_len > ckpt.max_positions:
        raise UsageError(f"--seq-len {seq_len} exceeds the model's {ckpt.max_positions} positions")


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
