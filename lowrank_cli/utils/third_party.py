"""Keeping optional third-party libraries quiet and out of the user's folders.

- `gptqmodel_hidden()`: PEFT asks, for every layer it adapts, whether it is a gptqmodel layer, which imports
  gptqmodel when it is installed; the import prints a banner and environment notes on stderr. For a model
  with no quantized layer the answer is known (no), so gptqmodel is hidden from that check.
- `gptqmodel_logs_elsewhere()`: gptqmodel's quantizer writes `logs/*_log_*.log` under the current folder;
  this points it at a temporary folder that is removed afterwards.
"""

from __future__ import annotations

import contextlib
import shutil
import sys
import tempfile
from pathlib import Path

__all__ = ["gptqmodel_hidden", "gptqmodel_logs_elsewhere", "has_quantized_layers"]


def has_quantized_layers(model) -> bool:
    """True if any module keeps packed weights (GPTQ kernels, `qweight`) or the model was loaded quantized."""
    if getattr(model, "hf_quantizer", None) is not None or getattr(model, "is_quantized", False):
        return True
    return any("qweight" in getattr(m, "_buffers", {}) for m in model.modules())


@contextlib.contextmanager
def gptqmodel_hidden():
    """While active, `import gptqmodel` fails and `importlib.util.find_spec("gptqmodel")` is None; PEFT's cached
    availability answer is cleared on exit so a later quantized model in this process still finds it."""
    if "gptqmodel" in sys.modules:  # already imported (and already announced): nothing to hide
        yield
        return
    sys.modules["gptqmodel"] = None
    try:
        yield
    finally:
        if "gptqmodel" in sys.modules and sys.modules["gptqmodel"] is None:
            del sys.modules["gptqmodel"]
        with contextlib.suppress(ImportError, AttributeError):
            from peft import import_utils

            import_utils.is_gptqmodel_available.cache_clear()


@contextlib.contextmanager
def gptqmodel_logs_elsewhere():
    """gptqmodel's per-run quantization logs go to a temporary folder instead of ./logs."""
    from gptqmodel.looper import loop_processor

    folder = Path(tempfile.mkdtemp(prefix="gptqmodel-logs-"))
    saved = loop_processor._PROJECT_LOG_DIR
    loop_processor._PROJECT_LOG_DIR = folder
    try:
        yield folder
    finally:
        loop_processor._PROJECT_LOG_DIR = saved
        shutil.rmtree(folder, ignore_errors=True)
