"""Keeping stdout for the one JSON document under --json."""

from __future__ import annotations

import contextlib
import os
import sys

__all__ = ["stdout_to_stderr"]


@contextlib.contextmanager
def stdout_to_stderr():
    """Under --json, stdout carries one object; libraries that print banners on import (gptqmodel does,
    when transformers loads a GPTQ checkpoint) write to stderr instead: at the Python level, and at the
    file-descriptor level for writers that hold the original stream."""
    sys.stdout.flush()
    try:
        fd, err = sys.stdout.fileno(), sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):  # captured streams (tests) have no descriptor
        fd = err = None
    saved = os.dup(fd) if fd is not None else None
    if saved is not None:
        os.dup2(err, fd)
    try:
        with contextlib.redirect_stdout(sys.stderr):
            yield
    finally:
        if saved is not None:
            for stream in (sys.stdout, sys.__stdout__):
                with contextlib.suppress(Exception):
                    stream.flush()  # anything buffered for the old stdout goes to stderr, not the result
            os.dup2(saved, fd)
            os.close(saved)
