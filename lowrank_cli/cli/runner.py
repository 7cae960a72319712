"""Run one command: logging, progress, result rendering, errors -> exit codes.

Streams: the result goes to stdout (a table, or exactly one JSON object with --json); logs, warnings and
progress go to stderr. Progress bars appear only when stderr is a terminal and neither --json nor --quiet
is set. Errors are one line on stderr (and the JSON error object on stdout with --json); -v adds the
traceback.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import signal
import sys
import threading
import traceback
from collections.abc import Callable
from dataclasses import dataclass

import typer

from lowrank_cli.errors import summarize
from lowrank_cli.result import error_document, ok_document
from lowrank_cli.utils.streams import stdout_to_stderr

__all__ = ["GlobalState", "STATE", "run", "json_error", "Terminated"]


class Terminated(BaseException):
    """Raised in the main thread on SIGTERM (CI cancellation, timeouts, `docker stop`): like Ctrl-C, it
    unwinds every `with` block, so temporary output folders are removed, then the process exits 143."""


def _raise_terminated(signum, frame):
    raise Terminated()


@contextlib.contextmanager
def _sigterm_unwinds():
    if threading.current_thread() is not threading.main_thread():  # signals reach the main thread only
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@dataclass
class GlobalState:
    verbose: int = 0
    quiet: bool = False


STATE = GlobalState()


def _configure_logging(json_mode: bool) -> None:
    if STATE.verbose >= 1:
        level = logging.DEBUG
    elif STATE.quiet or json_mode or not sys.stderr.isatty():
        level = logging.WARNING
    else:
        level = logging.INFO
    log = logging.getLogger("lowrank")
    log.handlers.clear()
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    log.addHandler(handler)
    log.setLevel(level)
    log.propagate = False
    # transformers/accelerate chatter ("Loading weights" bars, deprecations) is not ours to show; the hub
    # reads this variable when first imported, and the commands import it lazily, after this point
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    for noisy in ("transformers", "accelerate", "huggingface_hub"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    if not STATE.verbose:
        # Optional quantization libraries that transformers imports when installed: torchao warns about
        # its CUDA-only extensions, torch about torchao's pytree registrations. Shown with -v.
        # bitsandbytes (imported by peft) and its `kernels` loader warn about optional CPU kernels.
        for noisy in ("torchao", "torch.utils._pytree", "optimum", "gptqmodel", "bitsandbytes", "kernels"):
            logging.getLogger(noisy).setLevel(logging.ERROR)
    if "transformers" in sys.modules:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()


def _progress(json_mode: bool):
    from lowrank_cli.utils.progress import LogProgress, Progress

    if json_mode or STATE.quiet:
        return Progress()
    if sys.stderr.isatty():
        from lowrank_cli.cli.bars import RichProgress

        return RichProgress()
    return LogProgress()


class _ConsoleStream:
    def __init__(self, console):
        self.console = console

    def write(self, text: str) -> None:
        if text.strip():
            self.console.print(text.rstrip("\n"), markup=False, highlight=False)

    def flush(self) -> None:
        pass


def _clean(value):
    """JSON has no NaN/inf: they become null (a diverged perplexity is reported as such elsewhere)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


def _emit_json(doc: dict) -> None:
    sys.stdout.write(json.dumps(_clean(doc), default=str) + "\n")
    sys.stdout.flush()


def json_error(command: str, kind: str, message: str, code: int, hint: str | None = None,
               extra: dict | None = None) -> None:
    _emit_json({**error_document(command, kind, message, code, hint), **(extra or {})})


def _render_human(result) -> None:
    if hasattr(result, "render"):  # results that are text to print as is (e.g. `recipe show`)
        result.render()
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(show_header=False, box=None, pad_edge=False)
    for key, value in result.summary():
        if isinstance(value, float):
            value = f"{value:.6g}"
        table.add_row(f"[bold]{key}[/bold]", str(value))
    Console(soft_wrap=True).print(table)


def run(command: str, job: Callable, *, json_mode: bool) -> None:
    """Call `job(progress)` -> Result; render it; map failures to exit codes."""
    _configure_logging(json_mode)
    progress = _progress(json_mode)
    console = getattr(progress, "console", None)
    if console is not None:  # log lines print above the live bars instead of through them
        logging.getLogger("lowrank").handlers[0].stream = _ConsoleStream(console)
    from lowrank_cli.io.output import release_locks

    try:
        # stdout carries only the result: libraries that print banners (gptqmodel does when a GPTQ model
        # loads) write to stderr instead; SIGTERM unwinds like Ctrl-C (temporary folders removed)
        with _sigterm_unwinds(), stdout_to_stderr():
            result = job(progress)
    except KeyboardInterrupt:
        _fail(command, ("interrupted", "interrupted", 130, None), json_mode, None)
    except Terminated:
        _fail(command, ("terminated", "terminated (SIGTERM)", 143, None), json_mode, None)
    except typer.Exit:
        raise
    except Exception as exc:  # anything unexpected too: still one line unless -v
        _fail(command, summarize(exc), json_mode, exc)
    finally:
        release_locks()  # a run that failed before its output folder was made still held the output's lock
        close = getattr(progress, "close", None)
        if close:
            close()
    if json_mode:
        _emit_json(ok_document(command, result))
    else:
        _render_human(result)
    logging.getLogger("lowrank").debug("done")


def _fail(command: str, summary: tuple, json_mode: bool, exc: BaseException | None) -> None:
    kind, first_line, code, hint = summary
    if STATE.verbose >= 1 and exc is not None:
        traceback.print_exception(exc, file=sys.stderr)
    sys.stderr.write(f"error: {first_line}\n")
    for line in getattr(exc, "lines", ()):  # errors that list several problems (a recipe's)
        sys.stderr.write(f"{line}\n")
    if hint:
        sys.stderr.write(f"hint: {hint}\n")
    if json_mode:
        json_error(command, kind, first_line, code, hint, getattr(exc, "json_extra", None))
    raise typer.Exit(code)
