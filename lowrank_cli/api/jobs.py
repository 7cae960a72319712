"""Every job the CLI and recipes run: its options dataclass and its library function, one line each.

A job is at once a `lowrank` command (`lowrank_cli/cli/commands.py` builds it from the options' fields) and
a recipe step kind (`lowrank_cli/recipes/schema.py` builds its strict schema from the same fields). The
functions are imported when a job runs, so listing the jobs imports nothing heavy (`lowrank --help`).

    from lowrank_cli.api.jobs import JOBS
    job = JOBS["decompose"]
    result = job.run("demo", job.options(params_ratio=0.8, output="out/x"))
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from lowrank_cli.api.options.compress import CompressOptions
from lowrank_cli.api.options.decompose import DecomposeOptions
from lowrank_cli.api.options.env import EnvOptions
from lowrank_cli.api.options.evaluate import EvalOptions
from lowrank_cli.api.options.fields import OUTPUT_PANEL, OptionSpec, argument_spec, option_specs
from lowrank_cli.api.options.finetune import FinetuneOptions
from lowrank_cli.api.options.merge import MergeOptions
from lowrank_cli.api.options.quantize import QuantizeOptions
from lowrank_cli.api.options.trp import TRPOptions
from lowrank_cli.utils.progress import Progress

__all__ = ["Job", "JOBS", "MODEL_HELP", "JSON_SPEC"]

MODEL_HELP = "A local HF checkpoint folder, a hub id (e.g. bigcode/starcoder), or 'demo' (the bundled model)."
# a command-line switch of every command, not an option of any job: `lowrank run --json` sets it for steps
JSON_SPEC = OptionSpec(key="json", param="json_out", flags=("--json",), off_flag=None, base=bool, is_list=False,
                       default=False, required=False, panel=OUTPUT_PANEL,
                       help="Print exactly one JSON object on stdout (errors too); no progress bars.")


@dataclass(frozen=True)
class Job:
    name: str  # the command and recipe step name
    options: type  # its options dataclass
    function: str  # "module:function", called as function(model, options, progress)
    takes_model: bool = True  # False: function(options, progress)

    def specs(self) -> list[OptionSpec]:
        """Every key of the command, in order: MODEL, the options' fields, --json."""
        model = [argument_spec("model", MODEL_HELP)] if self.takes_model else []
        return [*model, *option_specs(self.options), JSON_SPEC]

    def make_options(self, values: Mapping[str, Any]) -> Any:
        """The options object from command-line or recipe values keyed by field name (text parsed: '1%' ->
        0.01); fields not given keep their defaults."""
        given = {s.param: s.value(values[s.param]) for s in option_specs(self.options) if s.param in values}
        return self.options(**given)

    def run(self, model: str | None, options: Any, progress: Progress | None = None) -> Any:
        """Call the library function: `lowrank_cli.api.<module>.<function>(model, options, progress)`."""
        module, name = self.function.split(":")
        function = getattr(importlib.import_module(module), name)
        progress = progress or Progress()
        return function(model, options, progress) if self.takes_model else function(options, progress)


JOBS: dict[str, Job] = {job.name: job for job in (
    Job("eval", EvalOptions, "lowrank_cli.api.evaluate:evaluate"),
    Job("decompose", DecomposeOptions, "lowrank_cli.api.decompose:decompose"),
    Job("env", EnvOptions, "lowrank_cli.api.env:environment", takes_model=False),
    Job("finetune", FinetuneOptions, "lowrank_cli.api.finetune:finetune"),
    Job("quantize", QuantizeOptions, "lowrank_cli.api.quantize:quantize"),
    Job("compress", CompressOptions, "lowrank_cli.api.compress:compress"),
    Job("merge", MergeOptions, "lowrank_cli.api.merge:merge"),
    Job("trp-train", TRPOptions, "lowrank_cli.api.trp:trp_train"),
)}
