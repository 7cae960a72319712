"""Errors that carry the process exit code the CLI documents (README, "Exit codes")."""

from __future__ import annotations

__all__ = ["LowrankError", "UsageError", "BudgetNotMet", "RuntimeFailure", "EXIT_OK", "summarize"]

EXIT_OK = 0


class LowrankError(Exception):
    """Base error: a one-line message for the user plus an exit code."""

    exit_code = 1
    kind = "runtime"

    def __init__(self, message: str, *, hint: str | None = None, details: dict | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint
        self.details = details or {}


class RuntimeFailure(LowrankError):
    """Something failed while running (exit 1)."""


class UsageError(LowrankError):
    """Bad usage, input or configuration (exit 2): nothing was written."""

    exit_code = 2
    kind = "usage"


class BudgetNotMet(LowrankError):
    """A quality budget could not be met (exit 3): nothing that looks like a result was written."""

    exit_code = 3
    kind = "budget"


def summarize(exc: BaseException) -> tuple[str, str, int, str | None]:
    """(kind, first line of the message, exit code, hint) of a failure: a LowrankError's own, anything else
    a runtime failure (exit 1)."""
    if isinstance(exc, LowrankError):
        kind, message, code, hint = exc.kind, exc.message, exc.exit_code, exc.hint
    else:
        kind, message, code, hint = "runtime", f"{type(exc).__name__}: {exc}", 1, None
    text = message.strip()
    return kind, text.splitlines()[0] if text else kind, code, hint
