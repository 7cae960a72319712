"""`lowrank finetune`: parameter-efficient fine-tuning (lora, lora-pro, bone, loldu) of a dense, factorized,
GPTQ or 4-bit (QLoRA) base, through the one training loop (`lowrank_cli.train.loop`).

Flow:
  1. check everything cheap first: options, model folder, output folder, method, a --resume checkpoint's
     fingerprint (so a mismatched resume fails in a second, before any output exists);
  2. data: train and held-out examples (`lowrank_cli.train.data`);
  3. base model (factorized checkpoints through `modeling.export.load_model`; --load-in-4bit through
     bitsandbytes nf4 + PEFT's prepare_model_for_kbit_training; GPTQ checkpoints as transformers loads
     them), targets resolved, the method's adapter attached and its optimizer built;
  4. train (checkpoints under OUT's hidden sibling `.OUT.checkpoints/` or --checkpoint-dir);
  5. write the adapter (PeftModel.from_pretrained loads it), tokenizer files, loss_curve.jsonl/.png and
     lowrank.json, atomically; the default checkpoint folder is removed once OUT is complete.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from lowrank_cli.api.common import check_device, load_tokenizer, with_overrides
from lowrank_cli.api.options.finetune import FinetuneOptions
from lowrank_cli.errors import UsageError
from lowrank_cli.io.checkpoint import Checkpoint
from lowrank_cli.io.output import OutputDir, check_output_target
from lowrank_cli.io.resolve import resolve_model
from lowrank_cli.result import Result
from lowrank_cli.utils.progress import Progress

__all__ = ["FinetuneOptions", "FinetuneResult", "finetune", "default_checkpoint_dir"]

log = logging.getLogger("lowrank")

@dataclass
class FinetuneResult(Result):
    model: str
    output: str | None
    method: str
    base: str  # dense | factorized | gptq | bnb-4bit
    params: dict  # trainable, total, trainable_fraction
    targets: dict  # layers, modules, a few names
    loss: dict  # train_final, eval_before, eval_after, eval_best
    steps: int
    tokens: int
    data: dict
    timings_s: dict
    memory: dict
    resumed_from_step: int | None = None
    checkpoint_dir: str | None = None
    files: list = field(default_factory=list)

    def summary(self):
        p, loss = self.params, self.loss

        def fmt(v):
            return "n/a" if v is None else f"{v:.4f}"

        rows = [("model", f"{self.model} ({self.base})"), ("method", self.method), ("output", self.output),
                ("trainable params", f"{p['trainable']:,} of {p['total']:,} ({p['trainable_fraction']:.3%})"),
                ("adapted modules", f"{self.targets['modules']} in {self.targets['layers']} layers"),
                ("steps", self.steps), ("tokens", f"{self.tokens:,}"),
                ("train loss (last steps)", fmt(loss.get("train_final"))),
                ("eval loss", f"{fmt(loss.get('eval_before'))} -> {fmt(loss.get('eval_after'))}"),
                ("step time", f"{self.timings_s.get('step_mean', 0):.3f} s"),
                ("peak memory", f"{(self.memory.get('peak_device_bytes') or self.memory['peak_rss_bytes']) / 2**20:.0f}"
                                f" MiB ({'device' if self.memory.get('peak_device_bytes') else 'RSS'})")]
        if self.resumed_from_step is not None:
            rows.append(("resumed from step", self.resumed_from_step))
        return rows


def default_checkpoint_dir(output: str | Path) -> Path:
    out = Path(output).expanduser().resolve()
    return out.parent / f".{out.name}.checkpoints"


def finetune(model: str, opts: FinetuneOptions | None = None, progress: Progress | None = None,
             **overrides) -> FinetuneResult:
    """Fine-tune MODEL with opts.method; see FinetuneOptions. Raises UsageError (2) on bad input."""
    opts = with_overrides(opts or FinetuneOptions(), overrides)
    progress = progress or Progress()
    opts.validate()
    # the method's defaults written in: the manifest and the resume fingerprint name the values used
    opts = replace(opts, lr=opts.learning_rate(),
                   alpha=opts.adapter_spec([]).alpha)
    path = resolve_model(model)
    check_output_target(opts.output, overwrite=opts.overwrite, inputs=[path])
    check_device(opts.device)
    from lowrank_cli.methods.finetune.registry import get_method
    from lowrank_cli.train.loop import resume_point, run_fingerprint

    method = get_method(opts.method)
    ckpt = Checkpoint(path)
    base_kind = _base_kind(ckpt, opts)
    loop_config = opts.loop_config(opts.fingerprint(ckpt.fingerprint()))
    ckpt_dir = Path(opts.checkpoint_dir).expanduser().resolve() if opts.checkpoint_dir \
        else default_checkpoint_dir(opts.output)
    resume_from = resume_point(ckpt_dir, run_fingerprint(loop_config), resume=opts.resume,
                               save_every=opts.save_every, overwrite=opts.overwrite,
                               explicit_dir=bool(opts.checkpoint_dir))

    from lowrank_cli.train.data import build_datasets, collate_fn

    tokenizer = load_tokenizer(path)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    budget = (opts.max_steps * opts.batch_size * opts.grad_accum * opts.max_seq_len * world
              if opts.max_steps else None)
    data = build_datasets(tokenizer, opts.data, opts.eval_data, text_field=opts.text_field,
                          max_seq_len=opts.max_seq_len, packing=opts.packing, seed=opts.seed,
                          token_budget=budget, max_eval_examples=opts.eval_examples())

    import torch

    from lowrank_cli.methods.finetune.targets import module_names, resolve_targets

    net = _load_base(path, ckpt, opts, base_kind)
    layers = resolve_targets(net, opts.targets, rank=opts.rank)
    spec = opts.adapter_spec(module_names(layers))
    total_params = sum(p.numel() for p in net.parameters())
    torch.manual_seed(opts.seed)  # adapter initialisation
    from lowrank_cli.utils.third_party import gptqmodel_hidden, has_quantized_layers

    with contextlib.nullcontext() if has_quantized_layers(net) else gptqmodel_hidden():
        net = method.attach(net, spec)
    trainable = sum(p.numel() for p in net.parameters() if p.requires_grad)
    optimizer = method.optimizer(net, spec, lr=opts.learning_rate(), weight_decay=opts.weight_decay)

    from lowrank_cli.train.loop import train

    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    outcome = train(net, optimizer, data.train, config=loop_config, collate=collate_fn(pad),
                    eval_dataset=data.eval, checkpoint_dir=ckpt_dir if opts.save_every else None,
                    resume_from=resume_from, progress=progress)

    result = FinetuneResult(
        model=model, output=str(Path(opts.output).expanduser().resolve()), method=opts.method, base=base_kind,
        params={"trainable": trainable, "total": total_params + trainable,  # adapters add new parameters
                "trainable_fraction": trainable / max(1, total_params + trainable)},
        targets={"layers": len(layers), "modules": len(spec.targets), "first": spec.targets[:4]},
        loss={"train_final": outcome.final_train_loss, "eval_before": outcome.initial_eval_loss,
              "eval_after": outcome.final_eval_loss, "eval_best": outcome.best_eval_loss},
        steps=outcome.steps, tokens=outcome.tokens, data=data.info, timings_s=outcome.timings_s,
        memory=outcome.memory, resumed_from_step=outcome.resumed_from_step,
        checkpoint_dir=str(ckpt_dir) if opts.save_every else None)
    if not outcome.is_main_process:
        return result
    result.files = _write(net, method, spec, tokenizer, path, model, opts, outcome, result)
    if opts.save_every and not opts.checkpoint_dir:  # ours, and no longer needed once OUT is complete
        shutil.rmtree(ckpt_dir, ignore_errors=True)
        result.checkpoint_dir = None
    return result


def _base_kind(ckpt: Checkpoint, opts: FinetuneOptions) -> str:
    from lowrank_cli.modeling.export import is_factorized

    quant = ckpt.quantization
    if quant:
        kind = str(quant.get("quant_method", "?")).lower()
        if opts.load_in_4bit:
            raise UsageError(f"the model is already quantized ({kind}); drop --load-in-4bit")
        if kind != "gptq":
            raise UsageError(f"the model is quantized with '{kind}'; finetune takes GPTQ checkpoints "
                             "(lowrank quantize) or full-precision ones (with --load-in-4bit for QLoRA)")
        return "gptq"
    factorized = is_factorized(ckpt.config)
    if opts.load_in_4bit:
        return "factorized+bnb-4bit" if factorized else "bnb-4bit"
    return "factorized" if factorized else "dense"




def _load_base(path: Path, ckpt: Checkpoint, opts: FinetuneOptions, base_kind: str):
    import torch

    from lowrank_cli.engine.streamed import resolve_dtype
    from lowrank_cli.modeling.export import load_model

    device = opts.device
    if device.startswith("cuda") and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        from accelerate import PartialState

        device = str(PartialState().device)  # one GPU per process under `accelerate launch`
    dtype = resolve_dtype(opts.dtype, device)
    kwargs = {}
    if "bnb-4bit" in base_kind:
        try:
            import bitsandbytes  # noqa: F401
            from transformers import BitsAndBytesConfig
        except ImportError as exc:
            raise UsageError("--load-in-4bit needs bitsandbytes: pip install bitsandbytes") from exc
        compute = dtype if dtype != torch.float16 or device != "cpu" else torch.float32
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=compute)
    if base_kind == "gptq":
        from transformers import GPTQConfig

        # a kernel that backpropagates to its input: on CPU gptqmodel's default int4pack kernel switches
        # itself to an autograd-less path for good after a first no-grad forward (our eval before training)
        kwargs["quantization_config"] = GPTQConfig(bits=int(ckpt.quantization.get("bits", 4)),
                                                   backend="torch" if device == "cpu" else "auto_trainable")
    try:
        net = load_model(path, dtype=dtype, device=device, **kwargs)
    except UsageError:
        raise
    except ImportError as exc:
        raise UsageError(f"loading this {base_kind} model needs a missing package: {exc}") from exc
    if base_kind in ("gptq", "bnb-4bit", "factorized+bnb-4bit"):
        from peft import prepare_model_for_kbit_training

        # activation checkpointing stays off: step time comparable with the other bases; memory is the
        # quantized weights' saving
        net = prepare_model_for_kbit_training(net, use_gradient_checkpointing=False)
    if "bnb-4bit" in base_kind and device == "cpu":
        # bitsandbytes repacks a 4-bit weight for its CPU inference kernel on the first no-grad eval-mode
        # forward (our eval before training), which asserts out_features % 32 == 0: a LoRD factor of rank
        # 16 fails. The plain layout trains and evaluates alike.
        for module in net.modules():
            if hasattr(module, "support_avx512bf16_for_cpu"):
                module.support_avx512bf16_for_cpu = False
    for p in net.parameters():
        p.requires_grad_(False)
    return net


def _write(net, method, spec, tokenizer, path: Path, model: str, opts: FinetuneOptions, outcome,
           result: FinetuneResult) -> list[str]:
    from lowrank_cli.io.manifest import write_manifest
    from lowrank_cli.train.curve import plot_curve, write_curve_jsonl

    out = OutputDir(opts.output, overwrite=opts.overwrite, inputs=[path])
    base_name = str(path) if Path(model).expanduser().exists() or model == "demo" else model
    with out as tmp:
        method.save(net, tmp, spec, base_name_or_path=base_name)
        tokenizer.save_pretrained(str(tmp))
        write_curve_jsonl(outcome.curve, tmp / "loss_curve.jsonl")
        plot_curve(outcome.curve, tmp / "loss_curve.png", initial_eval=outcome.initial_eval_loss,
                   title=f"{opts.method} r={opts.rank} on {Path(model).name}")
        options = asdict(opts)
        options["targets_resolved"] = spec.targets
        write_manifest(tmp, command="finetune", options=options,
                       input_info={"model": model, "path": str(path), "base": result.base,
                                   "fingerprint": Checkpoint(path).fingerprint()},
                       metrics={"loss": result.loss, "params": result.params, "steps": result.steps,
                                "tokens": result.tokens, "step_time_s": outcome.timings_s.get("step_mean"),
                                "memory": result.memory, "timings_s": result.timings_s,
                                "mixed_precision": outcome.mixed_precision,
                                "num_processes": outcome.num_processes,
                                "resumed_from_step": outcome.resumed_from_step},
                       extra={"data": result.data, "targets": spec.targets})
        files = sorted(p.name for p in tmp.iterdir())
        out.commit()
    return files
