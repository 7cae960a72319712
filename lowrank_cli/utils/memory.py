"""Peak resident memory of this process, on every platform.

`resource` exists only on POSIX, and its `ru_maxrss` is KiB on Linux but bytes on macOS; psutil (a core
dependency) reports the peak on Windows (`peak_wset`). Without either, 0 (unknown) rather than a crash.
"""

from __future__ import annotations

import sys

__all__ = ["peak_rss_bytes"]


def peak_rss_bytes() -> int:
    """The largest resident set size this process has had so far, in bytes (0 if the platform cannot say)."""
    try:
        import resource
    except ImportError:  # Windows
        return _psutil_peak()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


def _psutil_peak() -> int:
    try:
        import psutil
    except ImportError:  # pragma: no cover - psutil is a core dependency
        return 0
    info = psutil.Process().memory_info()
    return int(getattr(info, "peak_wset", 0) or info.rss)
