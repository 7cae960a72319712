"""`lowrank env`: versions and devices, for bug reports."""

from __future__ import annotations

import platform
from dataclasses import dataclass

from lowrank_cli.api.options.env import EnvOptions
from lowrank_cli.io.manifest import versions
from lowrank_cli.result import Result
from lowrank_cli.utils.progress import Progress

__all__ = ["EnvResult", "environment"]


@dataclass
class EnvResult(Result):
    versions: dict
    platform: str
    cpu_count: int
    cuda_available: bool
    cuda_version: str | None
    devices: list

    def summary(self):
        rows = [(name, v or "not installed") for name, v in self.versions.items()]
        rows += [("platform", self.platform), ("cpus", self.cpu_count),
                 ("cuda", self.cuda_version if self.cuda_available else "not available")]
        rows += [(f"device {i}", d) for i, d in enumerate(self.devices)]
        return rows


def environment(opts: EnvOptions | None = None, progress: Progress | None = None) -> EnvResult:
    """Versions and devices (`opts` and `progress` exist for the job interface; env has no options)."""
    import os

    import torch

    devices = []
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(i)
            devices.append(f"{props.name} ({props.total_memory / 2**30:.1f} GiB)")
    return EnvResult(versions=versions(), platform=platform.platform(), cpu_count=os.cpu_count() or 1,
                     cuda_available=torch.cuda.is_available(), cuda_version=torch.version.cuda,
                     devices=devices)
