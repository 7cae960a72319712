"""The process's peak resident memory, in bytes, on every platform."""

from __future__ import annotations

import sys

__all__ = ["peak_rss_bytes"]


def peak_rss_bytes() -> int | None:
    """Peak RSS in bytes: `ru_maxrss` is KiB on Linux and bytes on macOS; Windows has no `resource`
    module, where psutil's peak working set stands in. None where neither is available."""
    try:
        import resource
    except ImportError:
        try:
            import psutil

            info = psutil.Process().memory_info()
            return int(getattr(info, "peak_wset", info.rss))
        except Exception:  # psutil missing or the platform gives no figure
            return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)
