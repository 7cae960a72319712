"""Errors that carry the process exit code the CLI documents (README, "Exit codes")."""

from __future__ import annotations

__all__ = ["LowrankError", "UsageError", "BudgetNotMet", "RuntimeFailure", "EXIT_OK"]

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
