"""`lowrank eval`: perplexity of a checkpoint under the documented protocol."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from lowrank_cli.api.common import check_device, load_tokenizer, text_windows
from lowrank_cli.data.windows import fingerprint
from lowrank_cli.engine.streamed import resolve_dtype
from lowrank_cli.errors import UsageError
from lowrank_cli.eval.perplexity import nll_full, nll_streamed
from lowrank_cli.io.checkpoint import Checkpoint
from lowrank_cli.io.resolve import resolve_model
from lowrank_cli.result import Result
from lowrank_cli.utils.progress import Progress

__all__ = ["EvalResult", "evaluate"]


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


def evaluate(model: str, *, data: str | None = None, text_field: str = "text", seq_len: int = 512,
             max_tokens: int = 8192, batch_size: int = 1, device: str = "cpu", dtype: str = "auto",
             streaming: bool = False, seed: int = 0, progress: Progress | None = None) -> EvalResult:
    """Perplexity of MODEL on evaluation text (default: the stdlib's held-out "eval" part)."""
    progress = progress or Progress()
    path = resolve_model(model)
    check_device(device)
    ckpt = Checkpoint(path)
    if ckpt.max_positions is not None and seq_len > ckpt.max_positions:
        raise UsageError(f"--seq-len {seq_len} is longer than the {ckpt.max_positions} positions '{model}' has; "
                         f"use --seq-len {ckpt.max_positions} or less")
    tokenizer = load_tokenizer(path)
    windows = text_windows(tokenizer, data, part="eval", seq_len=seq_len, max_tokens=max_tokens,
                           seed=seed, text_field=text_field)
    torch_dtype = resolve_dtype(dtype, device)
    start = time.perf_counter()
    if streaming:
        from lowrank_cli.engine.streamed import StreamedModel
        from lowrank_cli.io.gptq_view import dequantizing

        streamed = StreamedModel(dequantizing(ckpt), device=device, dtype=torch_dtype)
        task = progress.task("blocks", streamed.num_blocks)
        result = nll_streamed(streamed, windows, batch_size, progress=lambda d, t: task.advance())
        task.close()
    else:
        from lowrank_cli.modeling.export import load_model

        net = load_model(path, dtype=torch_dtype, device=device)
        task = progress.task("windows", windows.shape[0])
        result = nll_full(net, windows, batch_size, progress=lambda d, t: task.advance())
        task.close()
    return EvalResult(
        model=model, perplexity=result.perplexity, nll=result.mean, tokens=result.tokens,
        windows=int(windows.shape[0]), seq_len=seq_len, data=data or "stdlib", params=ckpt.num_params(),
        mode="streamed" if streaming else "full", seconds=round(time.perf_counter() - start, 3),
        data_fingerprint=fingerprint(windows),
    )
