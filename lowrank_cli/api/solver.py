"""What every streamed solver job (decompose, quantize, compress) does before its own work: validate the
options, resolve the model, check the output and device (a --dry-run plan may be made for a device this
machine lacks), open the checkpoint, then build the streamed skeleton and pick the targets."""

from __future__ import annotations

from lowrank_cli.api.common import Timer, check_device, check_seq_len, with_overrides
from lowrank_cli.errors import UsageError
from lowrank_cli.io.checkpoint import Checkpoint
from lowrank_cli.io.output import check_output_target
from lowrank_cli.io.resolve import resolve_model

__all__ = ["open_input", "SolverJob", "GRAM_STORE_SHARE"]

# The share of host memory the original model's Grams may take to be kept from one pass for the next
# (GramStore): a quarter leaves the block, its activations and the Fisher pass's boundaries room on any machine.
GRAM_STORE_SHARE = 0.25


def open_input(model: str, opts, overrides: dict, *, refuse_quantized: str) -> tuple:
    """(opts with overrides, resolved path, Checkpoint). `refuse_quantized`: the hint for a GPTQ input."""
    opts = with_overrides(opts, overrides)
    opts.validate()
    path = resolve_model(model)
    if not opts.dry_run:
        if opts.output:
            check_output_target(opts.output, overwrite=opts.overwrite, inputs=[path])
        check_device(opts.device)
    ckpt = Checkpoint(path)
    check_seq_len(ckpt, opts.calib_seq_len)
    if ckpt.quantization:
        raise UsageError(f"'{model}' is already quantized ({ckpt.quantization.get('quant_method', '?')}); "
                         f"{refuse_quantized}")
    return opts, path, ckpt


class SolverJob:
    """The streamed model (skeleton on meta; `--dry-run` reads headers only, on CPU), its targets, a timer."""

    def __init__(self, model: str, path, ckpt, opts, progress, patterns=None):
        from lowrank_cli.engine.precision import dtype_name
        from lowrank_cli.engine.streamed import StreamedModel, resolve_dtype
        from lowrank_cli.engine.targets import select_targets

        self.model, self.path, self.ckpt, self.opts, self.progress = model, path, ckpt, opts, progress
        self.timer = Timer()
        self.dtype = resolve_dtype(opts.dtype, opts.device)
        self.precision: dict[str, str] = {"compute": dtype_name(self.dtype)}  # what each pass ran in (manifest)
        with self.timer("load"):
            self.streamed = StreamedModel(ckpt, device="cpu" if opts.dry_run else opts.device, dtype=self.dtype,
                                          offload_dir=opts.offload_dir)
            self.targets = select_targets(self.streamed.model, self.streamed.blocks_name, patterns)

    def profiler(self, method: str, curves: bool, store=None):
        """The profile pass's modifier (error curves; float32 Gram products, CURVE_PRODUCTS, unless its Grams fill
        a GramStore `store` for later passes: then that store's products), the precision of those products
        recorded when it reads data."""
        from lowrank_cli.engine.precision import dtype_name
        from lowrank_cli.methods.decompose.modifier import CURVE_PRODUCTS, Profiler

        products = store.product_dtype if store is not None else CURVE_PRODUCTS
        profiler = Profiler(method, self.opts.damp, curves=curves, product_dtype=products)
        if profiler.needs_data:
            import torch

            self.precision["profile_gram_products"] = dtype_name(profiler.product_dtype or torch.float64)
        return profiler

    def grams_fit(self) -> bool:
        """Whether the original model's Grams can be kept: their bound (one float64 n x n Gram per target, which
        layers sharing an input only overstate) fits GRAM_STORE_SHARE of this machine's memory."""
        return self.gram_store_bound() <= self._gram_store_limit()

    def make_gram_store(self, product_dtype):
        """A GramStore for the original model's Grams (ask `grams_fit` first)."""
        from lowrank_cli.engine.calibration import GramStore

        return GramStore(self._gram_store_limit(), product_dtype=product_dtype)

    def gram_store_bound(self) -> int:
        return sum(8 * t.n * t.n for t in self.targets)

    @staticmethod
    def _gram_store_limit() -> int:
        import psutil

        return int(GRAM_STORE_SHARE * psutil.virtual_memory().total)

    def sensitivities(self, calib, boundaries) -> dict:
        """Each target's loss per unit of output error (Fisher): one streamed backward pass over the
        calibration windows, replaying the block boundaries a profile pass kept, which are then released
        (memory handed back to the OS before the next pass)."""
        from lowrank_cli.engine.precision import dtype_name, steering_dtype
        from lowrank_cli.engine.streamed import release_freed_memory
        from lowrank_cli.methods.decompose.sensitivity import output_sensitivities

        # the sensitivities only steer the allocation: bfloat16 products where they are fast (engine/precision.py)
        autocast = steering_dtype(self.opts.sensitivity_dtype, self.opts.device, self.dtype)
        self.precision["sensitivity"] = dtype_name(autocast or self.dtype)
        with self.timer("sensitivity"):
            task = self.progress.task("sensitivity", self.streamed.num_blocks)
            sens = output_sensitivities(self.streamed, calib, boundaries, self.targets, self.opts.batch_size,
                                        lambda *_: task.advance(), autocast=autocast)
            task.close()
        for acts in boundaries:
            acts.release()
        release_freed_memory()
        return sens
