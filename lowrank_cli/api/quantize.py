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

import json
import logging
import math
import shutil
from dataclasses import dataclass, field

from lowrank_cli.api.common import (
    Timer,
    calibration_and_eval_windows,
    check_device,
    load_tokenizer,
    with_overrides,
)
from lowrank_cli.errors import UsageError
from lowrank_cli.io.checkpoint import Checkpoint
from lowrank_cli.io.output import OutputDir, check_output_target
from lowrank_cli.io.resolve import resolve_model
from lowrank_cli.result import Result
from lowrank_cli.utils.memory import peak_rss_bytes
from lowrank_cli.utils.progress import Progress

__all__ = ["QuantizeOptions", "QuantizeResult", "quantize", "METHODS", "BITS"]

log = logging.getLogger("lowrank")
METHODS = ("gptq", "rtn")
BITS = (2, 3, 4, 8)
LOADABLE_GROUP_SIZES = (-1, 16, 32, 64, 128, 256, 512, 1024)  # what gptqmodel's kernels accept


@dataclass
class QuantizeOptions:
    """Every knob of a quantize run; defaults are the recommended setting (GPTQ 4-bit, group 128)."""

    output: str | None = None
    bits: int = 4
    group_size: int = 128  # input columns sharing a scale; -1 = one scale per output channel
    # Asymmetric grids and act-order measured best (benchmarks/quantize_quality.py: SmolLM2 4-bit g128 code
    # ppl 9.89 vs 11.08 for symmetric without act-order); every GPTQ loader reads both. Marlin-class GPU
    # kernels want sym=True.
    sym: bool = False  # False: min/max grid per group; True: zero point in the middle
    act_order: bool = True  # columns in decreasing Hessian-diagonal order ("desc_act")
    damp: float = 0.01  # Hessian damping, a fraction of its mean diagonal
    method: str = "gptq"  # gptq: error-feedback solve; rtn: round to nearest (the baseline)
    calib: str | None = None
    calib_samples: int = 128
    calib_seq_len: int = 512
    eval_data: str | None = None
    eval_tokens: int = 4096
    skip_eval: bool = False
    text_field: str = "text"
    max_shard_size: str = "2GB"
    device: str = "cpu"
    dtype: str = "auto"
    batch_size: int = 1
    offload_dir: str | None = None
    overwrite: bool = False
    seed: int = 0

    def validate(self) -> None:
        if self.bits not in BITS:
            raise UsageError(f"--bits {self.bits} is not supported (choose {', '.join(map(str, BITS))})")
        if self.group_size != -1 and self.group_size < 1:
            raise UsageError(f"--group-size must be positive or -1 (per channel), got {self.group_size}")
        if self.method not in METHODS:
            raise UsageError(f"unknown --method '{self.method}' (choose {', '.join(METHODS)})")
        if not 0 <= self.damp < 1:
            raise UsageError(f"--damp must be in [0, 1), got {self.damp}")
        for name in ("calib_samples", "eval_tokens", "batch_size"):
            if getattr(self, name) < 1:
                raise UsageError(f"--{name.replace('_', '-')} must be at least 1")
        if self.calib_seq_len < 2:
            raise UsageError(f"--seq-len must be at least 2, got {self.calib_seq_len}")
        from lowrank_cli.io.writer import parse_size

        parse_size(self.max_shard_size)
        if not self.output:
            raise UsageError("an output folder is required: -o/--output OUT")


@dataclass
class QuantizeResult(Result):
    model: str
    output: str
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

    def summary(self):
        q, s = self.perplexity, self.size
        grid = f"{self.bits}-bit, group {self.group_size}, {'sym' if self.sym else 'asym'}" + (
            ", act-order" if self.act_order else "")
        rows = [("model", self.model), ("method", f"{self.method} ({grid})"), ("output", self.output),
                ("quantized layers", f"{self.layers}" + (" (both factors of each factorized layer)" if self.factorized
                                                        else "")),
                ("weights", f"{s['before'] / 2**20:.1f} MiB -> {s['after'] / 2**20:.1f} MiB")]
        if q.get("baseline") is not None:
            rows.append(("perplexity", f"{q['baseline']:.4f} -> {q['final']:.4f} ({q['increase'] * 100:+.2f}%)"))
        else:
            rows.append(("perplexity", f"{q['final']:.4f}"))
        if self.error.get("gptq") is not None:
            rows.append(("output error", f"{self.error['gptq']:.4g} (round-to-nearest {self.error['rtn']:.4g})"))
        rows.append(("time", f"{sum(self.timings_s.values()):.1f} s"))
        return rows


def quantize(model: str, opts: QuantizeOptions | None = None, progress: Progress | None = None,
             **overrides) -> QuantizeResult:
    """Quantize MODEL's block linears (both factors of each factorized layer). Raises UsageError (2)."""
    opts = with_overrides(opts or QuantizeOptions(), overrides)
    opts.validate()
    path = resolve_model(model)
    check_output_target(opts.output, overwrite=opts.overwrite, inputs=[path])
    check_device(opts.device)
    ckpt = Checkpoint(path)
    if ckpt.quantization:
        raise UsageError(f"'{model}' is already quantized ({ckpt.quantization.get('quant_method', '?')}); "
                         "quantize a full-precision checkpoint")
    return _run(model, path, ckpt, opts, progress or Progress())


def _run(model, path, ckpt, opts: QuantizeOptions, progress) -> QuantizeResult:
    import torch

    from lowrank_cli.engine.streamed import StreamedModel, resolve_dtype
    from lowrank_cli.eval.perplexity import nll_streamed
    from lowrank_cli.io.manifest import write_manifest
    from lowrank_cli.io.verify import verify_checkpoint
    from lowrank_cli.io.writer import ShardWriter, parse_size
    from lowrank_cli.methods.decompose.targets import select_targets
    from lowrank_cli.methods.quantize.grid import Grid
    from lowrank_cli.methods.quantize.packing import packable
    from lowrank_cli.methods.quantize.passes import quantize_pass
    from lowrank_cli.modeling import export

    timer = Timer()
    dtype = resolve_dtype(opts.dtype, opts.device)
    with timer("load"):
        streamed = StreamedModel(ckpt, device=opts.device, dtype=dtype, offload_dir=opts.offload_dir)
        targets = select_targets(streamed.model, streamed.blocks_name, None)
    bad = [(t.name, reason) for t in targets if (reason := packable(t.n, t.m))]
    if bad:
        name, reason = bad[0]
        more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
        hint = " (decompose with --rank-multiple 32)" if export.is_factorized(ckpt.config) else ""
        raise UsageError(f"cannot pack '{name}' in the GPTQ format: {reason}{more}{hint}")
    grid = Grid(opts.bits, opts.group_size, opts.sym)
    if opts.group_size not in LOADABLE_GROUP_SIZES:
        sizes = ", ".join(map(str, LOADABLE_GROUP_SIZES[1:]))
        log.warning("group size %d: transformers + gptqmodel load only group sizes %s (and -1); "
                    "`lowrank eval` still runs the output", opts.group_size, sizes)

    tokenizer = load_tokenizer(path)
    with timer("data"):
        calib, evalw = calibration_and_eval_windows(tokenizer, opts)
    widest = max(t.n for t in targets)
    if opts.method == "gptq" and calib.numel() < widest:
        raise UsageError(f"calibration text too short: {calib.numel()} tokens for layers up to {widest} inputs "
                         f"wide; GPTQ needs at least {widest} (ideally many more: --calib, --calib-samples)")
    log.info("calibration %d x %d tokens, evaluation %d x %d tokens", *calib.shape, *evalw.shape)
    torch.manual_seed(opts.seed)

    def block_task(label):
        task = progress.task(label, streamed.num_blocks)
        return task, (lambda *_: task.advance())

    baseline = None
    if not opts.skip_eval:
        with timer("baseline"):
            task, tick = block_task("baseline")
            baseline = nll_streamed(streamed, evalw, opts.batch_size, progress=tick).perplexity
            task.close()
        log.info("baseline perplexity %.4f", baseline)

    out = OutputDir(opts.output, overwrite=opts.overwrite, inputs=[path])
    with out as tmp:
        writer = ShardWriter(tmp, parse_size(opts.max_shard_size))

        def sink(name, tensor):
            writer.add(name, tensor.to(torch.float16) if tensor.is_floating_point() else tensor)

        with timer("quantize"):
            task, tick = block_task("quantize")
            outcome = quantize_pass(streamed, calib, evalw, targets, grid, method=opts.method, damp=opts.damp,
                                    act_order=opts.act_order, batch_size=opts.batch_size, sink=sink,
                                    progress=tick)
            task.close()
        with timer("write"):
            for name in ckpt.names():
                if not name.startswith(streamed.blocks_name + "."):
                    tensor = ckpt.get(name)
                    sink(name, tensor)
            writer.close()
            config = dict(ckpt.config)
            factorized = export.is_factorized(config)
            if export.quantized_needs_remote_code(config):
                export.write_modeling_file(tmp, ckpt.model_type)
                if not factorized:  # a factorized config already maps to the modeling file
                    config = export.remote_code_config(config)
            config["quantization_config"] = {
                "quant_method": "gptq", "bits": opts.bits, "group_size": opts.group_size,
                "desc_act": opts.act_order, "sym": opts.sym, "checkpoint_format": "gptq",
                "pack_dtype": "int32", "damp_percent": opts.damp, "true_sequential": True,
                "meta": {"quantizer": ["lowrank_cli"], "method": opts.method}}
            uneven = [t.name for t in targets if opts.group_size != -1 and t.n % opts.group_size]
            if uneven:
                # gptqmodel's fast kernels (int4 CPU matmul, exllama, marlin) need the group size to divide
                # every input width and fail at the first forward otherwise; its torch kernel reads g_idx
                # as written and runs anywhere. Loaders may still ask for another backend explicitly.
                config["quantization_config"]["backend"] = "torch"
                log.info("group size %d does not divide %d layer widths (e.g. %s): the checkpoint asks for "
                         "gptqmodel's portable torch kernel", opts.group_size, len(uneven), uneven[0])
            config["dtype"] = "float16"
            config.pop("torch_dtype", None)
            (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
            for side in ckpt.side_files():
                shutil.copy2(side, tmp / side.name)
            verify_checkpoint(tmp)

        final = outcome.nll.perplexity
        perplexity = {"baseline": baseline, "final": final,
                      "increase": None if baseline is None else final / baseline - 1,
                      "eval_tokens": outcome.nll.tokens, "calib_tokens": int(calib.numel())}
        errs = [r for r in outcome.layers if "output_error" in r]
        error = {"gptq": _mean(r["output_error"] for r in errs), "rtn": _mean(r["rtn_output_error"] for r in errs),
                 "measure": "mean over layers of ||(W - Q) X||^2 / ||W X||^2 on the calibration inputs"}
        size = {"before": ckpt.total_bytes(), "after": Checkpoint(tmp).total_bytes()}
        memory = {"peak_resident_param_bytes": streamed.peak_resident_bytes,
                  "peak_rss_bytes": peak_rss_bytes()}
        result = QuantizeResult(model=model, output=str(out.target), method=opts.method, bits=opts.bits,
                                group_size=opts.group_size, sym=opts.sym, act_order=opts.act_order,
                                factorized=factorized, layers=len(outcome.layers), size=size,
                                perplexity=perplexity, error=error, timings_s=timer.seconds, memory=memory)
        write_manifest(tmp, command="quantize", options=vars(opts),
                       input_info={"model": model, "path": str(path), "fingerprint": ckpt.fingerprint()},
                       metrics={"perplexity": perplexity, "error": error, "size": size},
                       extra={"layers": outcome.layers, "timings_s": timer.seconds})
        out.commit()
    return result


def _mean(values) -> float | None:
    values = [v for v in values if v is not None and math.isfinite(v)]
    return sum(values) / len(values) if values else None
