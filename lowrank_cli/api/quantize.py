"""`lowrank quantize`: GPTQ on dense and factorized checkpoints, streamed, in the GPTQ checkpoint format.

Flow (one decoder block in memory at a time):
  1. profile: the original model over the evaluation windows -> baseline perplexity (skippable);
  2. quantize: per block, per input group, the layer Hessians on the outputs of the already-quantized
     layers -> GPTQ -> the block's weights replaced by their dequantized values -> the next block's inputs;
     the evaluation windows ride along, giving the quantized perplexity in the same pass;
  3. write: packed shards, config with quantization_config (+ remote code where the architecture needs it),
     side files, verification, manifest; rename into place.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

from lowrank_cli.api.common import load_tokenizer, solver_windows
from lowrank_cli.api.options.quantize import BITS, METHODS, QuantizeOptions
from lowrank_cli.api.solver import SolverJob, open_input
from lowrank_cli.errors import UsageError
from lowrank_cli.io.output import OutputDir
from lowrank_cli.result import Result
from lowrank_cli.utils.progress import Progress

__all__ = ["QuantizeOptions", "QuantizeResult", "quantize", "METHODS", "BITS"]

log = logging.getLogger("lowrank")
LOADABLE_GROUP_SIZES = (-1, 16, 32, 64, 128, 256, 512, 1024)  # what gptqmodel's kernels accept


@dataclass
class QuantizeResult(Result):
    model: str
    output: str | None
    method: str
    bits: int
    group_size: int
    sym: bool
    act_order: bool
    factorized: bool
    layers: int
    size: dict  # bytes of the weights before and after
    perplexity: dict  # baseline (unless skipped), final, increase
    error: dict  # mean relative output error of GPTQ and of round-to-nearest on the same layers
    timings_s: dict = field(default_factory=dict)
    memory: dict = field(default_factory=dict)
    dry_run: bool = False

    def summary(self):
        q, s = self.perplexity, self.size
        grid = f"{self.bits}-bit, group {self.group_size}, {'sym' if self.sym else 'asym'}" + (
            ", act-order" if self.act_order else "")
        if self.dry_run:
            return [("model", self.model), ("method", f"{self.method} ({grid})"), ("dry run", "nothing written"),
                    ("quantized layers", self.layers),
                    ("est. weights", f"{s['before'] / 2**20:.1f} MiB -> {s['after'] / 2**20:.1f} MiB"),
                    ("est. peak memory", f"{self.memory['total'] / 2**20:.1f} MiB on {self.memory['device']} "
                                         f"({self.memory['compute_dtype']})")]
        rows = [("model", self.model), ("method", f"{self.method} ({grid})"), ("output", self.output),
                ("quantized layers", f"{self.layers}" + (" (both factors of each factorized layer)" if self.factorized
                                                        else "")),
                ("weights", f"{s['before'] / 2**20:.1f} MiB -> {s['after'] / 2**20:.1f} MiB")]
        if q.get("baseline") is not None:
            rows.append(("perplexity (eval)", f"{q['baseline']:.4f} -> {q['final']:.4f} "
                                              f"({q['increase'] * 100:+.2f}%)"))
            rows.append(("perplexity (test)", f"{q['test_baseline']:.4f} -> {q['test_final']:.4f} "
                                              f"({q['test_increase'] * 100:+.2f}%)"))
        elif q.get("final") is not None:
            rows.append(("perplexity (eval, test)", f"{q['final']:.4f}, {q['test_final']:.4f}"))
        else:
            rows.append(("perplexity", "not measured (--eval-tokens 0)"))
        if self.error.get("gptq") is not None:
            rows.append(("output error", f"{self.error['gptq']:.4g} (round-to-nearest {self.error['rtn']:.4g})"))
        rows.append(("time", f"{sum(self.timings_s.values()):.1f} s"))
        return rows


def quantize(model: str, opts: QuantizeOptions | None = None, progress: Progress | None = None,
             **overrides) -> QuantizeResult:
    """Quantize MODEL's block linears (both factors of each factorized layer). Raises UsageError (2)."""
    opts, path, ckpt = open_input(model, opts or QuantizeOptions(), overrides,
                                  refuse_quantized="quantize a full-precision checkpoint")
    job = _Job(model, path, ckpt, opts, progress or Progress())
    return job.plan_only() if opts.dry_run else job.run()


def gptq_config(opts, uneven: bool) -> dict:
    """The `quantization_config` transformers + gptqmodel read."""
    config = {"quant_method": "gptq", "bits": opts.bits, "group_size": opts.group_size, "desc_act": opts.act_order,
              "sym": opts.sym, "checkpoint_format": "gptq", "pack_dtype": "int32", "damp_percent": opts.damp,
              "true_sequential": opts.true_sequential, "meta": {"quantizer": ["lowrank_cli"], "method": opts.method}}
    if uneven:
        # gptqmodel's fast kernels (int4 CPU matmul, exllama, marlin) need the group size to divide every
        # input width and fail at the first forward otherwise; its torch kernel reads g_idx as written and
        # runs anywhere. Loaders may still ask for another backend explicitly.
        config["backend"] = "torch"
    return config


def quantized_config(ckpt_config: dict, opts, targets, folder) -> dict:
    """The output's config.json: quantization_config, float16, and remote code where the architecture's
    own class cannot load quantized linears (see modeling/export.py)."""
    from lowrank_cli.modeling import export

    config = dict(ckpt_config)
    if export.quantized_needs_remote_code(config):
        export.write_modeling_file(folder, config.get("model_type", ""))
        if not export.is_factorized(config):  # a factorized config already maps to the modeling file
            config = export.remote_code_config(config)
    uneven = [t.name for t in targets if opts.group_size != -1 and t.n % opts.group_size]
    if uneven:
        log.info("group size %d does not divide %d layer widths (e.g. %s): the checkpoint asks for gptqmodel's "
                 "portable torch kernel", opts.group_size, len(uneven), uneven[0])
    config["quantization_config"] = gptq_config(opts, bool(uneven))
    config["dtype"] = "float16"
    config.pop("torch_dtype", None)
    return config


def check_packable(ckpt, targets) -> None:
    from lowrank_cli.methods.quantize.packing import packable
    from lowrank_cli.modeling import export

    bad = [(t.name, reason) for t in targets if (reason := packable(t.n, t.m))]
    if bad:
        name, reason = bad[0]
        more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
        hint = " (decompose with --rank-multiple 32)" if export.is_factorized(ckpt.config) else ""
        raise UsageError(f"cannot pack '{name}' in the GPTQ format: {reason}{more}{hint}")


class _Job(SolverJob):
    """One quantize run: plan -> one pipeline pass (baseline and quantized side by side) -> write."""

    def __init__(self, model: str, path, ckpt, opts: QuantizeOptions, progress: Progress):
        super().__init__(model, path, ckpt, opts, progress)
        check_packable(ckpt, self.targets)
        if opts.group_size not in LOADABLE_GROUP_SIZES:
            sizes = ", ".join(map(str, LOADABLE_GROUP_SIZES[1:]))
            log.warning("group size %d: transformers + gptqmodel load only group sizes %s (and -1); "
                        "`lowrank eval` still runs the output", opts.group_size, sizes)
        from lowrank_cli.modeling import export

        self.factorized = export.is_factorized(ckpt.config)

    def _result(self, **fields) -> QuantizeResult:
        o = self.opts
        return QuantizeResult(model=self.model, method=o.method, bits=o.bits, group_size=o.group_size, sym=o.sym,
                              act_order=o.act_order, factorized=self.factorized, timings_s=self.timer.seconds,
                              **fields)

    def plan_only(self) -> QuantizeResult:
        import torch

        from lowrank_cli.methods.decompose.plan import estimate_peak_bytes
        from lowrank_cli.methods.quantize.plan import quantized_checkpoint_bytes

        o, cfg = self.opts, self.streamed.model.config
        memory = estimate_peak_bytes(
            self.ckpt, self.streamed.blocks_name, self.streamed.num_blocks, self.targets, hidden=cfg.hidden_size,
            vocab=cfg.vocab_size, compute_bytes=torch.finfo(self.dtype).bits // 8,
            calib_tokens=o.calib_samples * o.calib_seq_len, eval_tokens=2 * (o.eval_tokens + o.test_tokens),
            seq_len=o.calib_seq_len, batch_size=o.batch_size, fisher=False)
        memory.update(device=o.device, compute_dtype=str(self.dtype).replace("torch.", ""))
        size = {"before": self.ckpt.total_bytes(),
                "after": quantized_checkpoint_bytes(self.ckpt, self.targets, o.bits, o.group_size)}
        return self._result(output=None, layers=len(self.targets), size=size, perplexity={}, error={},
                            memory=memory, dry_run=True)

    def run(self) -> QuantizeResult:
        import torch


        o = self.opts
        with self.timer("data"):
            self.windows = solver_windows(load_tokenizer(self.path), o)
        widest = max(t.n for t in self.targets)
        if o.method == "gptq" and self.windows.calib.numel() < widest:
            raise UsageError(f"calibration text too short: {self.windows.calib.numel()} tokens for layers up to "
                             f"{widest} inputs wide; GPTQ needs at least {widest} (ideally many more: --calib, "
                             "--calib-samples)")
        torch.manual_seed(o.seed)
        out = OutputDir(o.output, overwrite=o.overwrite, inputs=[self.path])
        with out as tmp:
            nll, layers = self._pass(tmp)
            result = self._write(tmp, nll, layers)
            result.output = str(out.target)
            out.commit()
        return result

    def _pass(self, tmp):
        """Baseline and quantized model in one streamed pass; the quantized tensors go to `tmp`."""
        import torch

        from lowrank_cli.engine.sequential import Candidate, Unchanged, run_pipeline
        from lowrank_cli.io.finish import copy_outer_tensors
        from lowrank_cli.io.writer import ShardWriter, parse_size
        from lowrank_cli.methods.quantize.grid import Grid
        from lowrank_cli.methods.quantize.modifier import Quantize

        o = self.opts
        writer = ShardWriter(tmp, parse_size(o.max_shard_size))

        def sink(name, tensor):
            writer.add(name, tensor.to(torch.float16) if tensor.is_floating_point() else tensor)

        quantizer = Quantize(Grid(o.bits, o.group_size, o.sym), method=o.method, damp=o.damp, act_order=o.act_order)
        evaluate = o.eval_tokens > 0
        candidates = [] if o.skip_eval or not evaluate else [Candidate("baseline", Unchanged())]
        candidates.append(Candidate("quantized", quantizer, sink))
        evalsets = {"eval": self.windows.eval, "test": self.windows.test} if evaluate else {}
        with self.timer("quantize"):
            task = self.progress.task("quantize", self.streamed.num_blocks)
            outcome = run_pipeline(self.streamed, self.windows.calib, evalsets, self.targets, candidates,
                                   true_sequential=o.true_sequential, batch_size=o.batch_size,
                                   progress=task.advance)
            task.close()
        with self.timer("write"):
            copy_outer_tensors(self.ckpt, self.streamed.blocks_name, sink)
            writer.close()
        return outcome.nll, outcome.layers["quantized"]

    def _write(self, tmp, nll: dict, layers: list[dict]) -> QuantizeResult:
        from lowrank_cli.io.finish import finish_folder, weight_file_bytes
        from lowrank_cli.utils.memory import peak_rss_bytes

        q, b = nll["quantized"], nll.get("baseline")
        perplexity = {"baseline": None, "final": None, "increase": None, "test_baseline": None, "test_final": None,
                      "test_increase": None, "eval_tokens": 0, "test_tokens": 0,
                      "calib_tokens": int(self.windows.calib.numel())}
        if q:  # --eval-tokens 0 measures none
            perplexity.update(final=q["eval"].perplexity, test_final=q["test"].perplexity,
                              eval_tokens=q["eval"].tokens, test_tokens=q["test"].tokens)
        if b is not None:
            perplexity.update(baseline=b["eval"].perplexity, test_baseline=b["test"].perplexity,
                              increase=q["eval"].perplexity / b["eval"].perplexity - 1,
                              test_increase=q["test"].perplexity / b["test"].perplexity - 1)
        errs = [r for r in layers if "output_error" in r]
        error = {"gptq": _mean(r["output_error"] for r in errs), "rtn": _mean(r["rtn_output_error"] for r in errs),
                 "measure": "mean over layers of ||(W - Q) X||^2 / ||W X||^2 on the calibration inputs"}
        config = quantized_config(self.ckpt.config, self.opts, self.targets, tmp)
        memory = {"peak_resident_param_bytes": self.streamed.peak_resident_bytes, "peak_rss_bytes": peak_rss_bytes()}
        size = {"before": self.ckpt.total_bytes(), "after": weight_file_bytes(tmp)}
        finish_folder(tmp, self.ckpt, config, command="quantize", options=vars(self.opts),
                      input_info={"model": self.model, "path": str(self.path), "fingerprint": self.ckpt.fingerprint()},
                      metrics={"perplexity": perplexity, "error": error, "size": size},
                      extra={"layers": layers, "timings_s": self.timer.seconds})
        return self._result(output=None, layers=len(layers), size=size, perplexity=perplexity, error=error,
                            memory=memory)


def _mean(values) -> float | None:
    values = [v for v in values if v is not None and math.isfinite(v)]
    return sum(values) / len(values) if values else None
