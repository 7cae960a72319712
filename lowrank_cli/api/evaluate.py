"""`lowrank eval`: perplexity of a checkpoint under the documented protocol."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from lowrank_cli.api.common import check_device, load_tokenizer, text_windows, with_overrides
from lowrank_cli.api.options.evaluate import EvalOptions
from lowrank_cli.data.windows import fingerprint
from lowrank_cli.engine.streamed import resolve_dtype
from lowrank_cli.errors import UsageError
from lowrank_cli.eval.perplexity import nll_full, nll_streamed
from lowrank_cli.io.checkpoint import Checkpoint
from lowrank_cli.io.resolve import resolve_model
from lowrank_cli.result import Result
from lowrank_cli.utils.progress import Progress

__all__ = ["EvalOptions", "EvalResult", "evaluate"]


@dataclass
class EvalResult(Result):
    model: str
    perplexity: float
    nll: float  # mean NLL per predicted token, nats
    tokens: int  # predicted tokens
    windows: int
    seq_len: int
    data: str
    mode: str  # "full" or "streamed"
    params: int
    seconds: float
    data_fingerprint: str = ""
    protocol: str = field(default="non-overlapping windows; token-weighted NLL of all but the first token")


def evaluate(model: str, opts: EvalOptions | None = None, progress: Progress | None = None,
             **overrides) -> EvalResult:
    """Perplexity of MODEL on evaluation text (default: the stdlib's held-out "eval" part); see EvalOptions.
    `evaluate("demo", max_tokens=4096)` sets options by keyword."""
    opts = with_overrides(opts or EvalOptions(), overrides)
    progress = progress or Progress()
    path = resolve_model(model)
    check_device(opts.device)
    ckpt = Checkpoint(path)
    if ckpt.max_positions is not None and opts.seq_len > ckpt.max_positions:
        raise UsageError(f"--seq-len {opts.seq_len} is longer than the {ckpt.max_positions} positions '{model}' has; "
                         f"use --seq-len {ckpt.max_positions} or less")
    tokenizer = load_tokenizer(path)
    windows = text_windows(tokenizer, opts.data, part="eval", seq_len=opts.seq_len, max_tokens=opts.max_tokens,
                           seed=opts.seed, text_field=opts.text_field)
    torch_dtype = resolve_dtype(opts.dtype, opts.device)
    start = time.perf_counter()
    if opts.streaming:
        from lowrank_cli.engine.streamed import StreamedModel
        from lowrank_cli.io.gptq_view import dequantizing

        streamed = StreamedModel(dequantizing(ckpt), device=opts.device, dtype=torch_dtype)
        task = progress.task("blocks", streamed.num_blocks)
        result = nll_streamed(streamed, windows, opts.batch_size, progress=lambda d, t: task.advance())
        task.close()
    else:
        from lowrank_cli.modeling.export import load_model

        net = load_model(path, dtype=torch_dtype, device=opts.device)
        task = progress.task("windows", windows.shape[0])
        result = nll_full(net, windows, opts.batch_size, progress=lambda d, t: task.advance())
        task.close()
    return EvalResult(
        model=model, perplexity=result.perplexity, nll=result.mean, tokens=result.tokens,
        windows=int(windows.shape[0]), seq_len=opts.seq_len, data=opts.data or "stdlib", params=ckpt.num_params(),
        mode="streamed" if opts.streaming else "full", seconds=round(time.perf_counter() - start, 3),
        data_fingerprint=fingerprint(windows),
    )
