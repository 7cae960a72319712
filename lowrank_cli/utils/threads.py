"""Thread counts chosen per operation size, so a busy machine does not stall the small operations.

Small CPU operations (a 576 x 576 eigh, GPTQ's column-by-column updates on vectors of a few thousand
numbers) synchronise their OpenMP team many times per call; on a busy machine (CI runners, a second job on
the same cores) a spinning team waits for a core at every barrier. Measured on this project's 2-core
machine with another job running: a 576 x 576 eigh took 2.4 s with 2 threads and 0.17 s with one; a GPTQ
solve of a 1024 x 1024 layer 7.8 s and 0.43 s (`benchmarks/pipeline_speed.py` has the end-to-end
figures). Large products keep every thread.
"""

from __future__ import annotations

from contextlib import contextmanager

__all__ = ["single_thread_upto", "SINGLE_THREAD_MAX"]

# Up to this size (the matrix's last dimension) a CPU decomposition or solve runs single-threaded.
SINGLE_THREAD_MAX = 4096


@contextmanager
def single_thread_upto(t, limit: int = SINGLE_THREAD_MAX):
    """One torch thread while inside, for a CPU tensor whose last dimension is at most `limit`."""
    import torch

    if t.device.type != "cpu" or t.shape[-1] > limit:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)
