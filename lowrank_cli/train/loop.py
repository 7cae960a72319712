"""The one training loop, on accelerate: `accelerate launch` gives multi-GPU, FSDP or DeepSpeed unchanged.

API (finetune and trp-train both call it):

    config = LoopConfig(max_steps=100, batch_size=4, grad_accum=8, warmup=0.03, eval_every=50,
                        save_every=50, fingerprint={"model": ..., "method": ..., "options": ...})
    result = train(model, optimizer, train_dataset, config=config, collate=collate,
                   eval_dataset=held_out, callbacks=[...], checkpoint_dir=ckpts, resume_from=None,
                   progress=progress)
    result.final_eval_loss, result.curve, result.steps, result.tokens, result.timings_s, result.memory

- `model`: a torch module whose forward takes the collated batch as keyword arguments and returns an
  object with `.loss` (any HF causal LM; `labels` = -100 where no loss is wanted). Only parameters with
  `requires_grad` are trained and checkpointed (the base weights are the caller's to reload).
- `optimizer`: built by the caller on the model's trainable parameters (the method modules' `optimizer()`),
  or None for AdamW(lr=config.lr, weight_decay=config.weight_decay) on every trainable parameter.
- `train_dataset` / `eval_dataset`: sequences of examples (dicts of token lists); `collate(examples)` ->
  dict of tensors (see `lowrank_cli.train.data.collate`).
- Schedule: linear warmup then cosine decay to 0 over the run (`warmup`: steps if >= 1, else a fraction of
  the steps). Gradients are clipped to `max_grad_norm` (the norm before clipping is logged).
- Steps: one optimizer step = `grad_accum` micro-batches of `batch_size` examples per process. Length is
  `max_steps`, or `epochs` passes over the data (micro-batches left over at the very end are dropped).
  Epochs continue an unfinished accumulation rather than cutting it short. A step's gradient is that of
  the mean token loss over the whole window (every micro-batch on every process): each micro-batch's
  summed loss is backpropagated and the sum divided by the window's labelled-token count (transformers'
  `num_items_in_batch` idea), so batch 2 and batch 1 x accumulation 2 train the same weights even when
  completions differ in length. The logged loss is that same token mean.
- Precision: `mixed_precision="auto"` is bf16 autocast on a GPU that has bf16, else fp32.
- Eval: the token-weighted mean loss over `eval_dataset` before training, every `eval_every` steps and at
  the end (best and final are reported).
- Callbacks (`lowrank_cli.train.callbacks.Callback`) run around each optimizer step; their
  `state_dict()` is checkpointed; entries they add to `logs` in `on_step_end` land in the curve rows.
- Checkpoints: every `save_every` steps into `checkpoint_dir/step-NNNNNN` (written under a temporary name
  and renamed, the newest `keep_checkpoints` kept) through `accelerator.save_state` (trainable weights
  only, optimizer, scheduler, the accumulation counter) plus every process's RNG states
  (`rng_state_<rank>.safetensors`), `loop_state.json` (position in the data, tokens, curve rows, the run
  fingerprint) and `callbacks.json` (+ `callbacks.safetensors`). No pickle of ours is written or read
  (see train/state_io.py). `resume_from` (a step folder, or a
  checkpoint folder whose newest step is taken) continues bit-exactly: the same parameters as a run that
  never stopped. A checkpoint whose fingerprint differs from `config.fingerprint` is refused (UsageError).
- Returns `LoopResult` (losses, steps, tokens, the curve rows, timings, peak memory). In a multi-process
  launch every process returns; `result.is_main_process` says which one should write outputs.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from lowrank_cli.errors import UsageError
from lowrank_cli.io.output import normalize_modes
from lowrank_cli.train.callbacks import Callback
from lowrank_cli.train.state_io import (
    PICKLED_STATE_FILES,
    load_callback_states,
    load_rng_states,
    rng_file,
    save_callback_states,
    save_rng_states,
)
from lowrank_cli.utils.memory import peak_rss_bytes
from lowrank_cli.utils.progress import Progress

__all__ = ["LoopConfig", "LoopResult", "train", "latest_checkpoint", "check_resume", "resume_point",
           "sharded_launch", "STATE_FILE", "fingerprint_diff", "run_fingerprint"]

log = logging.getLogger("lowrank")

STATE_FILE = "loop_state.json"
_STEP_PREFIX = "step-"


@dataclass
class LoopConfig:
    lr: float = 2e-4  # only used when train() builds the optimizer itself (optimizer=None)
    weight_decay: float = 0.0  # idem
    epochs: float | None = None  # passes over the data; ignored when max_steps is set
    max_steps: int | None = None  # optimizer steps; default 1 epoch when neither is set
    batch_size: int = 4  # examples per micro-batch per process
    grad_accum: int = 1  # micro-batches per optimizer step
    warmup: float = 0.03  # >= 1: steps; < 1: a fraction of the run's steps
    max_grad_norm: float | None = 1.0  # None or 0: no clipping
    mixed_precision: str = "auto"  # auto | no | bf16 | fp16
    device: str = "auto"  # auto (what accelerate picks) | cpu | cuda | cuda:N
    seed: int = 0
    eval_every: int | None = None  # steps; None: before and after training only
    save_every: int | None = None  # steps; None: no training checkpoints
    log_every: int = 1  # steps between curve rows
    keep_checkpoints: int = 2
    eval_at_start: bool = True
    fingerprint: dict = field(default_factory=dict)  # what must match for a resume (model, method, options)

    def validate(self) -> None:
        for name in ("batch_size", "grad_accum", "log_every", "keep_checkpoints"):
            if getattr(self, name) < 1:
                raise UsageError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.max_steps is not None and self.max_steps < 1:
            raise UsageError(f"--max-steps must be at least 1, got {self.max_steps}")
        if self.epochs is not None and self.epochs <= 0:
            raise UsageError(f"--epochs must be positive, got {self.epochs}")
        if self.warmup < 0:
            raise UsageError(f"--warmup must be >= 0 (steps, or a fraction of the run), got {self.warmup}")
        for name in ("eval_every", "save_every"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise UsageError(f"--{name.replace('_', '-')} must be at least 1, got {value}")
        if self.mixed_precision not in ("auto", "no", "bf16", "fp16"):
            raise UsageError(f"unknown mixed precision '{self.mixed_precision}' (auto, no, bf16, fp16)")
        if self.lr <= 0:
            raise UsageError(f"--lr must be positive, got {self.lr}")
        if self.weight_decay < 0:
            raise UsageError(f"--weight-decay must be >= 0, got {self.weight_decay}")

    def schedule_dict(self) -> dict:
        """The settings that shape the trajectory (part of every checkpoint's fingerprint)."""
        keys = ("lr", "weight_decay", "epochs", "max_steps", "batch_size", "grad_accum", "warmup",
                "max_grad_norm", "mixed_precision", "seed")
        return {k: getattr(self, k) for k in keys}


@dataclass
class LoopResult:
    steps: int
    total_steps: int
    epochs_done: float
    tokens: int  # input tokens seen (all processes)
    initial_eval_loss: float | None
    final_eval_loss: float | None
    best_eval_loss: float | None
    final_train_loss: float | None  # mean of the last min(10, steps) logged steps
    curve: list[dict]
    timings_s: dict  # total, train (optimizer steps only), eval, checkpoint, mean step
    memory: dict  # peak_rss_bytes, peak_device_bytes (None off GPU)
    resumed_from_step: int | None
    checkpoints: list[str]
    mixed_precision: str
    num_processes: int
    is_main_process: bool = True

    def to_dict(self) -> dict:
        return asdict(self)


# --------------------------------------------------------------------------------------------------------
# checkpoints


def latest_checkpoint(path: str | Path) -> Path | None:
    """A step folder itself, or the newest complete `step-N` inside a checkpoint folder; None if none."""
    path = Path(path)
    if (path / STATE_FILE).is_file():
        return path
    if not path.is_dir():
        return None
    steps = [p for p in path.iterdir() if p.is_dir() and p.name.startswith(_STEP_PREFIX)
             and p.name[len(_STEP_PREFIX):].isdigit() and (p / STATE_FILE).is_file()]
    return max(steps, key=lambda p: int(p.name[len(_STEP_PREFIX):]), default=None)


def fingerprint_diff(saved: dict, wanted: dict) -> list[str]:
    """Dotted keys where two fingerprints differ."""
    diffs = []
    for key in sorted(set(saved) | set(wanted)):
        a, b = saved.get(key), wanted.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            diffs += [f"{key}.{d}" for d in fingerprint_diff(a, b)]
        elif a != b:
            diffs.append(key)
    return diffs


def check_resume(resume_from: str | Path, fingerprint: dict) -> Path:
    """The step folder to resume from, after checking it belongs to this run; UsageError otherwise.

    Call it before any heavy work so a wrong --resume fails in a second."""
    found = latest_checkpoint(resume_from)
    if found is None:
        raise UsageError(f"--resume: no training checkpoint in '{resume_from}'")
    try:
        state = json.loads((found / STATE_FILE).read_text())
    except (OSError, ValueError) as exc:
        raise UsageError(f"--resume: unreadable checkpoint state '{found / STATE_FILE}' ({exc})") from exc
    saved = json.loads(json.dumps(state.get("fingerprint", {}), default=str))
    wanted = json.loads(json.dumps(fingerprint, default=str))
    diffs = fingerprint_diff(saved, wanted)
    if diffs:
        raise UsageError(f"--resume: checkpoint '{found}' is from another run (differs in "
                         f"{', '.join(diffs[:5])}); resume with the same model, method and options")
    return found


def resume_point(checkpoint_dir: Path, fingerprint: dict, *, resume: bool, save_every: int | None,
                 overwrite: bool, explicit_dir: bool) -> Path | None:
    """The step folder a run continues from (None: a fresh run). A fresh run that would save into a folder
    holding another run's checkpoints is refused, unless `overwrite` and the folder is the default one
    (an explicitly chosen folder is the user's to clear)."""
    if resume:
        return check_resume(checkpoint_dir, fingerprint)
    if save_every and checkpoint_dir.is_dir() and any(checkpoint_dir.iterdir()):
        if overwrite and not explicit_dir:
            shutil.rmtree(checkpoint_dir)
        else:
            raise UsageError(f"the checkpoint folder '{checkpoint_dir}' holds an earlier run's checkpoints: "
                             "continue it with --resume, or remove the folder (--overwrite does for the default "
                             "one)")
    return None


def sharded_launch() -> str | None:
    """"FSDP" or "DeepSpeed" when `accelerate launch` runs this process with parameter sharding, else None.
    Methods that need each weight whole on every process (LoRA-Pro's paired A/B solve, TRP's SVDs) refuse
    such launches up front instead of computing on shards."""
    if os.environ.get("ACCELERATE_USE_FSDP", "").lower() in ("1", "true"):
        return "FSDP"
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() in ("1", "true"):
        return "DeepSpeed"
    return None


def _trainable_names(model) -> list[str]:
    return [n for n, p in model.named_parameters() if p.requires_grad]


def _state_key_map(model) -> dict[str, str]:
    """parameter name -> state_dict key for trainable parameters (they coincide for ordinary modules)."""
    keys = set(model.state_dict().keys())
    mapping = {}
    for name in _trainable_names(model):
        if name in keys:
            mapping[name] = name
        else:  # a module wrapped by a forward hook wrapper (e.g. _orig_mod.) still ends with the name
            hits = [k for k in keys if k.endswith("." + name) or k == name]
            if len(hits) != 1:
                raise RuntimeError(f"cannot map trainable parameter {name} to one state_dict key")
            mapping[name] = hits[0]
    return mapping


# --------------------------------------------------------------------------------------------------------
# data order


class _EpochSampler:
    """Indices in a fixed shuffled order per epoch: permutation seeded by (seed, epoch) alone, so a resumed
    run sees exactly the order the uninterrupted run saw, whatever the global RNG did in between."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed, self.epoch = n, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        import torch

        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return iter(torch.randperm(self.n, generator=gen).tolist())


def _loader(dataset, *, batch_size: int, collate, seed: int, shuffle: bool):
    import torch
    from torch.utils.data import DataLoader

    # a private generator: creating an iterator must not draw from the global RNG (it would shift dropout
    # masks after a resume, which creates iterators at other points than the uninterrupted run)
    gen = torch.Generator().manual_seed(seed)
    sampler = _EpochSampler(len(dataset), seed) if shuffle else None
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, shuffle=False, collate_fn=collate,
                      generator=gen, drop_last=False)


# --------------------------------------------------------------------------------------------------------
# the loop


def _mixed_precision(config: LoopConfig, cpu: bool) -> str:
    if config.mixed_precision != "auto":
        return config.mixed_precision
    if cpu:
        return "no"  # CPU bf16 autocast is slow and lossy; fp32 is the honest default there
    import torch

    return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"


def _warmup_steps(config: LoopConfig, total: int) -> int:
    return int(config.warmup) if config.warmup >= 1 else int(math.ceil(config.warmup * total))


class _Run:
    """Mutable position of the run; saved in loop_state.json."""

    def __init__(self):
        self.step = 0  # optimizer steps done
        self.epoch = 0
        self.batch_in_epoch = 0  # micro-batches of the current epoch already consumed
        self.tokens = 0
        self.curve: list[dict] = []
        self.initial_eval: float | None = None
        self.best_eval: float | None = None
        self.last_eval: float | None = None
        self.train_seconds = 0.0

    def to_dict(self) -> dict:
        return dict(vars(self))

    def load(self, state: dict) -> None:
        for key in vars(self):
            if key in state:
                setattr(self, key, state[key])


def train(model, optimizer, train_dataset: Sequence, *, config: LoopConfig, collate: Callable,
          eval_dataset: Sequence | None = None, callbacks: Sequence[Callback] = (),
          checkpoint_dir: str | Path | None = None, resume_from: str | Path | None = None,
          progress: Progress | None = None) -> LoopResult:
    """Train `model` (see the module docstring); returns LoopResult."""
    import torch
    from accelerate import Accelerator
    from accelerate.utils import GradientAccumulationPlugin, set_seed
    from transformers import get_cosine_schedule_with_warmup

    config.validate()
    progress = progress or Progress()
    if len(train_dataset) == 0:
        raise UsageError("the training data holds no examples")
    resume_dir = check_resume(resume_from, run_fingerprint(config)) if resume_from else None
    if config.save_every and checkpoint_dir is None:
        raise UsageError("--save-every needs a checkpoint folder")
    if not _trainable_names(model):
        raise UsageError("the model has no trainable parameters")

    start = time.perf_counter()
    cpu = config.device == "cpu"
    if config.device.startswith("cuda:") and int(os.environ.get("WORLD_SIZE", "1")) == 1:
        torch.cuda.set_device(int(config.device.split(":", 1)[1]))  # accelerate uses the current device
    precision = _mixed_precision(config, cpu or not torch.cuda.is_available())
    accelerator = Accelerator(
        cpu=cpu, mixed_precision=precision,
        gradient_accumulation_plugin=GradientAccumulationPlugin(num_steps=config.grad_accum,
                                                                sync_with_dataloader=False),
        step_scheduler_with_optimizer=True)
    set_seed(config.seed)
    if accelerator.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(accelerator.device)

    if optimizer is None:
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    train_dl = _loader(train_dataset, batch_size=config.batch_size, collate=collate, seed=config.seed,
                       shuffle=True)
    eval_dl = (_loader(eval_dataset, batch_size=config.batch_size, collate=collate, seed=config.seed,
                       shuffle=False) if eval_dataset is not None and len(eval_dataset) else None)

    if hasattr(getattr(model, "config", None), "use_cache"):
        model.config.use_cache = False
    model.train()
    # total steps from the per-process loader length, known only once it is sharded
    prepared = accelerator.prepare(model, optimizer, train_dl, *([eval_dl] if eval_dl is not None else []))
    model_p, optim_p, train_dl = prepared[:3]
    eval_dl = prepared[3] if eval_dl is not None else None
    per_epoch = len(train_dl)
    if config.max_steps is not None:
        total = config.max_steps
    else:
        total = max(1, int((config.epochs or 1.0) * per_epoch) // config.grad_accum)
    # a prepared scheduler steps once per process per optimizer step (accelerate's convention)
    nproc = accelerator.num_processes
    scheduler = get_cosine_schedule_with_warmup(optim_p.optimizer if hasattr(optim_p, "optimizer") else optim_p,
                                                _warmup_steps(config, total) * nproc, total * nproc)
    scheduler = accelerator.prepare(scheduler)

    names = _trainable_names(accelerator.unwrap_model(model_p))
    _register_trainable_only(accelerator, names)

    run = _Run()
    callbacks = list(callbacks)
    if resume_dir is not None:
        _load_checkpoint(accelerator, resume_dir, run, callbacks)
        log.info("resumed from %s (step %d of %d)", resume_dir, run.step, total)
    resumed_from = run.step if resume_dir is not None else None

    def evaluate() -> float:
        """Token-weighted mean loss; per-sequence sums go through gather_for_metrics, which drops the
        samples accelerate repeats to give every process an equal share."""
        model_p.eval()
        total_loss, count = 0.0, 0.0
        with torch.no_grad():
            for batch in eval_dl:
                inputs = {k: v for k, v in batch.items() if k != "labels"}
                labels = batch["labels"] if "labels" in batch else batch["input_ids"]
                sums, counts = _sequence_losses(model_p(**inputs).logits, labels)
                sums, counts = accelerator.gather_for_metrics((sums, counts))
                total_loss += float(sums.sum())
                count += float(counts.sum())
        model_p.train()
        return total_loss / count if count > 0 else float("nan")

    timings = {"eval": 0.0, "checkpoint": 0.0}
    if eval_dl is not None and config.eval_at_start and resume_dir is None:
        t0 = time.perf_counter()
        run.initial_eval = run.last_eval = evaluate()
        run.best_eval = run.initial_eval
        timings["eval"] += time.perf_counter() - t0

    saved: list[str] = []
    task = progress.task("train", total)
    if run.step:
        task.advance(run.step)
    params = [p for p in model_p.parameters() if p.requires_grad]
    micro = 0  # micro-batches since the last optimizer step
    window_loss = torch.zeros((), dtype=torch.float64, device=accelerator.device)
    window_tokens = torch.zeros((), dtype=torch.float64, device=accelerator.device)
    window_labels = torch.zeros((), dtype=torch.float64, device=accelerator.device)  # predicted tokens
    # DeepSpeed steps inside backward, before the window's gradient could be divided by its token count
    deepspeed = accelerator.distributed_type == "DEEPSPEED"
    step_start = time.perf_counter()
    while run.step < total:
        _set_epoch(train_dl, run.epoch)
        loader = accelerator.skip_first_batches(train_dl, run.batch_in_epoch) if run.batch_in_epoch else train_dl
        exhausted = True
        for batch in loader:
            if micro == 0:
                step_start = time.perf_counter()
                for cb in callbacks:
                    cb.on_step_start(model_p, run.step)
            with accelerator.accumulate(model_p):
                out = model_p(**batch)
                labelled = _label_count(batch)
                summed = _summed_loss(out, labelled)
                accelerator.backward(out.loss if deepspeed else summed)
                window_loss += summed.detach().double()
                window_labels += labelled
                window_tokens += _input_tokens(batch)
                grad_norm = None
                if accelerator.sync_gradients:
                    window_labels = accelerator.reduce(window_labels, "sum")
                    if not deepspeed:
                        _divide_grads(params, window_labels, accelerator)
                    for cb in callbacks:
                        cb.on_before_optimizer_step(model_p, run.step)
                    if config.max_grad_norm:
                        grad_norm = accelerator.clip_grad_norm_(params, config.max_grad_norm)
                    else:
                        grad_norm = _grad_norm(params)
                optim_p.step()
                scheduler.step()
                optim_p.zero_grad(set_to_none=True)
            run.batch_in_epoch += 1
            micro += 1
            if not accelerator.sync_gradients:
                continue
            # one optimizer step done
            lr = scheduler.get_last_lr()[0]
            tokens = int(accelerator.reduce(window_tokens, "sum").item())
            loss = float(accelerator.reduce(window_loss, "sum").item() / max(float(window_labels), 1.0))
            micro = 0
            window_loss.zero_()
            window_labels = torch.zeros_like(window_loss)
            window_tokens.zero_()
            run.tokens += tokens
            run.step += 1
            run.train_seconds += time.perf_counter() - step_start
            logs = {"step": run.step, "loss": loss, "lr": lr,
                    "grad_norm": None if grad_norm is None else float(grad_norm), "tokens": run.tokens,
                    "epoch": round(run.epoch + run.batch_in_epoch / per_epoch, 4)}
            for cb in callbacks:
                cb.on_step_end(model_p, run.step - 1, logs)
            task.advance()
            last = run.step >= total
            if eval_dl is not None and (last or (config.eval_every and run.step % config.eval_every == 0)):
                t0 = time.perf_counter()
                run.last_eval = evaluate()
                run.best_eval = run.last_eval if run.best_eval is None else min(run.best_eval, run.last_eval)
                logs["eval_loss"] = run.last_eval
                timings["eval"] += time.perf_counter() - t0
            if last or run.step % config.log_every == 0 or "eval_loss" in logs:
                run.curve.append(logs)
            if config.save_every and (run.step % config.save_every == 0) and not last:
                t0 = time.perf_counter()
                saved.append(_save(accelerator, Path(checkpoint_dir), run, callbacks, config))
                timings["checkpoint"] += time.perf_counter() - t0
            if last:
                exhausted = False
                break
        if exhausted:
            run.epoch += 1
            run.batch_in_epoch = 0
    task.close()
    accelerator.wait_for_everyone()
    accelerator.unwrap_model(model_p, keep_fp32_wrapper=False)  # leave the caller's module as it was
    model_p.eval()

    losses = [r["loss"] for r in run.curve[-10:]]
    peak_device = torch.cuda.max_memory_allocated(accelerator.device) if accelerator.device.type == "cuda" else None
    timings.update(total=time.perf_counter() - start, train=run.train_seconds,
                   step_mean=run.train_seconds / max(1, run.step - (resumed_from or 0)))
    result = LoopResult(
        steps=run.step, total_steps=total, epochs_done=round(run.epoch + run.batch_in_epoch / per_epoch, 4),
        tokens=run.tokens, initial_eval_loss=run.initial_eval, final_eval_loss=run.last_eval,
        best_eval_loss=run.best_eval, final_train_loss=sum(losses) / len(losses) if losses else None,
        curve=run.curve, timings_s={k: round(v, 4) for k, v in timings.items()},
        memory={"peak_rss_bytes": peak_rss_bytes(), "peak_device_bytes": peak_device},
        resumed_from_step=resumed_from, checkpoints=saved, mixed_precision=precision,
        num_processes=nproc, is_main_process=accelerator.is_main_process)
    accelerator.free_memory()
    return result


def run_fingerprint(config: LoopConfig) -> dict:
    """What a checkpoint must share with this run to be resumed: the caller's fingerprint + the schedule."""
    return {**config.fingerprint, "schedule": config.schedule_dict()}


def _set_epoch(train_dl, epoch: int) -> None:
    """Reach our sampler through accelerate's wrappers (BatchSamplerShard -> BatchSampler -> sampler)."""
    if hasattr(train_dl, "set_epoch"):
        train_dl.set_epoch(epoch)
    obj = getattr(train_dl, "batch_sampler", None)
    for _ in range(4):
        if obj is None:
            return
        if isinstance(obj, _EpochSampler):
            obj.set_epoch(epoch)
            return
        obj = getattr(obj, "batch_sampler", None) or getattr(obj, "sampler", None)


def _sequence_losses(logits, labels):
    """(sum of next-token NLL, count of predicted tokens) per sequence, in float64."""
    import torch.nn.functional as F

    shift_logits, shift_labels = logits[:, :-1].float(), labels[:, 1:].to(logits.device)
    nll = F.cross_entropy(shift_logits.transpose(1, 2), shift_labels, ignore_index=-100, reduction="none")
    mask = shift_labels != -100
    return (nll * mask).double().sum(dim=1), mask.double().sum(dim=1)


def _label_count(batch):
    """Tokens whose next-token loss counts in this micro-batch (labels shifted by one, -100 left out), as a
    float64 scalar on the batch's device."""
    import torch

    labels = batch.get("labels")
    if labels is None:
        labels = batch["input_ids"]
    return (labels[:, 1:] != -100).sum().to(torch.float64)


def _summed_loss(out, labelled):
    """The micro-batch's summed token loss: HF models return the mean over its labelled tokens. A micro-batch
    with no labelled token contributes zero (its mean is NaN) while every parameter still joins the graph
    (DDP expects a gradient from each)."""
    if float(labelled) == 0.0:
        return out.logits.sum() * 0.0
    return out.loss * labelled.to(out.loss.dtype)


def _divide_grads(params, window_labels, accelerator) -> None:
    """Token-weighted accumulation (the idea of transformers' `num_items_in_batch`): every micro-batch
    backpropagated its summed loss, so the accumulated gradient is divided by the labelled tokens of the
    whole window on every process (`window_labels`, already summed across processes). A micro-batch mean
    per backward would weigh a short completion's tokens more than a long one's. accelerate's backward
    divided each loss by the accumulation steps and DDP averaged over processes; both are undone here.
    Under DeepSpeed the engine steps inside backward, before this could run: there the loop backpropagates
    each micro-batch's mean loss instead (the old weighting; a documented limitation)."""
    import torch

    total = float(window_labels)
    if total <= 0.0:
        return
    factor = accelerator.gradient_accumulation_steps * accelerator.num_processes / total
    with torch.no_grad():
        for p in params:
            if p.grad is not None:
                p.grad.mul_(factor)


def _input_tokens(batch):
    mask = batch.get("attention_mask")
    return mask.sum() if mask is not None else batch["input_ids"].numel()


def _grad_norm(params):
    import torch

    grads = [p.grad.detach().float().norm() for p in params if p.grad is not None]
    return torch.stack(grads).norm() if grads else torch.zeros(())


def _register_trainable_only(accelerator, names: list[str]) -> None:
    """Checkpoints hold the trainable parameters only (the frozen base is reloaded from its checkpoint):
    a save hook trims the state dict; a load hook loads the trimmed file itself, strictly."""

    def save_hook(models, weights, output_dir):
        for i, model in enumerate(models):
            if i < len(weights):
                mapping = _state_key_map(accelerator.unwrap_model(model))
                wanted = set(mapping.values())
                weights[i] = {k: v for k, v in weights[i].items() if k in wanted}

    def load_hook(models, input_dir):
        from safetensors.torch import load_file

        while models:
            model = models.pop(0)
            inner = accelerator.unwrap_model(model)
            mapping = _state_key_map(inner)
            file = Path(input_dir) / "model.safetensors"
            state = load_file(str(file))
            missing = set(mapping.values()) - set(state)
            extra = set(state) - set(mapping.values())
            if missing or extra:
                raise UsageError(f"--resume: the checkpoint's trainable weights do not match this model "
                                 f"(missing {sorted(missing)[:3]}, unexpected {sorted(extra)[:3]})")
            params = dict(inner.named_parameters())
            import torch

            with torch.no_grad():
                for name, key in mapping.items():
                    params[name].copy_(state[key])

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)


def _load_checkpoint(accelerator, resume_dir: Path, run: _Run, callbacks: list) -> None:
    """Weights, optimizer and scheduler through accelerate (torch.load with weights_only=True); our RNG and
    callback states from safetensors + JSON. A checkpoint that holds state only as pickle is refused."""
    import pickle

    own = rng_file(resume_dir, accelerator.process_index)
    pickled = [p.name for pattern in PICKLED_STATE_FILES for p in resume_dir.glob(pattern)]
    if not own.is_file() and pickled:
        raise UsageError(f"--resume: '{resume_dir}' keeps its training state as pickle ({pickled[0]}), which "
                         "lowrank does not load (it could run code); restart the training")
    try:
        accelerator.load_state(str(resume_dir))
    except pickle.UnpicklingError as exc:  # weights_only refused something that is not plain data
        raise UsageError(f"--resume: '{resume_dir}' holds a file that is not plain tensor data; refusing to "
                         f"load it ({str(exc).splitlines()[0]})") from exc
    if own.is_file():
        load_rng_states(own)
    run.load(json.loads((resume_dir / STATE_FILE).read_text()))
    states = load_callback_states(resume_dir) if callbacks else None
    if callbacks and states is None:
        raise UsageError(f"--resume: '{resume_dir}' holds no callback state (callbacks.json) for this run's "
                         "callbacks")
    if states is not None:
        if len(states) != len(callbacks):
            raise UsageError(f"--resume: '{resume_dir}' holds {len(states)} callback states, this run has "
                             f"{len(callbacks)} callbacks")
        for cb, state in zip(callbacks, states, strict=True):
            cb.load_state_dict(state)


def _save(accelerator, root: Path, run: _Run, callbacks, config: LoopConfig) -> str:
    final = root / f"{_STEP_PREFIX}{run.step:06d}"
    tmp = root / f".{final.name}.tmp"
    if accelerator.is_main_process:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    # accelerate writes the RNG states of process 0 only; every process keeps its own (dropout masks)
    save_rng_states(rng_file(tmp, accelerator.process_index))
    accelerator.wait_for_everyone()  # every process has written its part before the rename
    if accelerator.is_main_process:
        state = run.to_dict()
        state["fingerprint"] = run_fingerprint(config)
        (tmp / STATE_FILE).write_text(json.dumps(state, default=str))
        if callbacks:
            save_callback_states([cb.state_dict() for cb in callbacks], tmp)
        normalize_modes(tmp)  # safetensors writes 0600
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        steps = sorted((p for p in root.iterdir() if p.is_dir() and p.name.startswith(_STEP_PREFIX)),
                       key=lambda p: p.name)
        for old in steps[:-config.keep_checkpoints]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return str(final)
