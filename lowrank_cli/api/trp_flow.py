"""The steps of a trp-train run (see `lowrank_cli.api.trp` for the overview)."""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from lowrank_cli.api.common import Timer, check_device, load_tokenizer, text_windows
from lowrank_cli.errors import RuntimeFailure, UsageError
from lowrank_cli.io.checkpoint import Checkpoint
from lowrank_cli.io.output import OutputDir, check_output_target
from lowrank_cli.io.resolve import resolve_model
from lowrank_cli.result import Result
from lowrank_cli.train.callbacks import Callback

__all__ = ["run", "TRPResult", "StepTimer", "plot_ranks", "write_factorized"]

log = logging.getLogger("lowrank")


@dataclass
class TRPResult(Result):
    model: str
    output: str | None
    params: dict  # model/targeted before and after, trainable during training
    perplexity: dict  # before, trained (dense), final (factorized), eval tokens
    ranks: dict  # final: module -> rank (factorized modules only)
    dense_layers: list  # targets left dense (at or above break-even)
    rank_history: dict  # first/last TRP step's mean rank fraction, TRP steps
    overhead: dict  # TRP's measured cost against plain steps
    training: dict  # steps, tokens, losses
    timings_s: dict = field(default_factory=dict)
    files: list = field(default_factory=list)

    def summary(self):
        p, q, o = self.params, self.perplexity, self.overhead
        return [
            ("model", self.model), ("output", self.output),
            ("model params", f"{p['model_before']:,} -> {p['model_after']:,} ({p['model_ratio']:.3f})"),
            ("targeted params", f"{p['targeted_before']:,} -> {p['targeted_after']:,} "
                                f"({p['targeted_ratio']:.3f})"),
            ("factorized layers", f"{len(self.ranks)} of {p['targeted_layers']}"),
            ("perplexity", f"{q['before']:.4f} -> {q['trained']:.4f} trained -> {q['final']:.4f} factorized"),
            ("steps", f"{self.training['steps']} ({self.rank_history['trp_steps']} TRP steps, "
                      f"{self.training.get('optimizer', '?')} lr {self.training.get('lr', '?')})"),
            ("TRP overhead", f"{o['trp_seconds']:.2f} s in SVDs ({_percent(o['total_fraction'])} of training); "
                             f"TRP step {_seconds(o['mean_trp_step_s'])} vs plain {_seconds(o['mean_plain_step_s'])}"),
            ("time", f"{sum(self.timings_s.values()):.1f} s"),
        ]


def _seconds(value) -> str:
    return "n/a" if value is None else f"{value:.3f} s"


def _percent(value) -> str:
    return "n/a" if value is None else f"{value * 100:+.1f}%"


class StepTimer(Callback):
    """Wall time of every optimizer step, split into TRP steps and plain ones (put it before TRPCallback
    in the callback list so a TRP step's time includes its truncation). The first step of a run is left
    out: it carries one-time costs (allocator, lazy initialisation) that belong to neither kind."""

    def __init__(self, is_trp_step, cuda: bool):
        self.is_trp_step, self.cuda = is_trp_step, cuda
        self.trp: list[float] = []
        self.plain: list[float] = []
        self._start = None
        self._first = True

    def _now(self) -> float:
        if self.cuda:
            import torch

            torch.cuda.synchronize()
        return time.perf_counter()

    def on_step_start(self, model, step: int) -> None:
        self._start = self._now()

    def on_step_end(self, model, step: int, logs: dict) -> None:
        if self._start is not None and not self._first:
            (self.trp if self.is_trp_step(step) else self.plain).append(self._now() - self._start)
        self._start = None
        self._first = False

    def summary(self, trp_seconds: float, train_seconds: float | None) -> dict:
        """Step times by kind, and the truncation/sub-gradient time as a fraction of the rest of training
        (`train_seconds`: the loop's time in optimizer steps, every step included)."""
        def mean(xs):
            return sum(xs) / len(xs) if xs else None

        trp, plain = mean(self.trp), mean(self.plain)
        rest = (train_seconds or 0.0) - trp_seconds
        return {"trp_seconds": round(trp_seconds, 4), "trp_steps_timed": len(self.trp),
                "plain_steps_timed": len(self.plain), "mean_trp_step_s": trp, "mean_plain_step_s": plain,
                "per_trp_step": (trp / plain - 1) if trp and plain else None,
                "total_fraction": trp_seconds / rest if rest > 0 else None}


def _check_base(model: str, ckpt: Checkpoint) -> None:
    from lowrank_cli.modeling.export import is_factorized

    if ckpt.quantization:
        raise UsageError(f"'{model}' is quantized ({ckpt.quantization.get('quant_method', '?')}); trp-train "
                         "trains a full-precision checkpoint")
    if is_factorized(ckpt.config):
        raise UsageError(f"'{model}' is already factorized; trp-train takes a dense checkpoint "
                         "(lowrank merge --dense gives one)")




def _perplexity_windows(tokenizer, opts, data):
    """Held-out windows under `lowrank eval`'s protocol; from the held-out examples' tokens when the data
    are prompt/completion or chat records (no plain text to window)."""
    import torch

    spec = opts.eval_data or opts.data
    try:
        return text_windows(tokenizer, spec, part="eval", seq_len=opts.max_seq_len, max_tokens=opts.eval_tokens,
                            seed=opts.seed, text_field=opts.text_field,
                            same_source_as=opts.data if opts.eval_data is None else "unset")
    except UsageError:
        if not data.eval:
            raise
    stream = [t for e in data.eval for t in e["input_ids"]][: opts.eval_tokens]
    n = len(stream) // opts.max_seq_len
    if n == 0:
        raise UsageError("the held-out data is shorter than one --max-seq-len window")
    return torch.tensor(stream[: n * opts.max_seq_len]).reshape(n, opts.max_seq_len)


def _perplexity(net, windows, batch_size: int) -> float:
    from lowrank_cli.eval.perplexity import nll_full

    was_training = net.training
    net.eval()
    try:
        return nll_full(net, windows, batch_size).perplexity
    finally:
        net.train(was_training)


def plot_ranks(history: list[dict], full: dict[str, int], path: Path, title: str = "") -> bool:
    """Rank / min(m, n) of every target at every TRP step, one line per layer (darker = deeper)."""
    try:
        import matplotlib

        matplotlib.use("Agg", force=True)
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("matplotlib is not installed: trp_ranks.png not drawn")
        return False
    names = list(full)
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    try:
        cmap = plt.get_cmap("viridis")
        steps = [h["step"] for h in history]
        for i, name in enumerate(names):
            ax.plot(steps, [h["ranks"][name] / full[name] for h in history], color=cmap(i / max(1, len(names) - 1)),
                    linewidth=0.9, alpha=0.8, label=name if len(names) <= 8 else None)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("rank / min(m, n)")
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
        if title:
            ax.set_title(title, fontsize=10)
        if len(names) <= 8:
            ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(path)
    finally:
        plt.close(fig)
    return True


def write_factorized(folder: Path, net, ckpt: Checkpoint, ranks: dict[str, int], max_shard_size: str,
                     method: str = "trp") -> None:
    """The trained, factorized `net` as a factorized checkpoint (format of `lowrank decompose`): the base
    checkpoint's tensor names (so tied weights stay stored once), each factorized NAME.weight written as
    NAME.down.weight + NAME.up.weight and NAME.bias as NAME.up.bias, in the base's dtypes."""

    from lowrank_cli.io.writer import ShardWriter, parse_size
    from lowrank_cli.modeling import export

    state = net.state_dict()
    writer = ShardWriter(folder, parse_size(max_shard_size))
    for name in ckpt.names():
        dtype = ckpt.tensors[name].float_dtype
        module, _, leaf = name.rpartition(".")
        if module in ranks:
            outs = [f"{module}.down.weight", f"{module}.up.weight"] if leaf == "weight" else [f"{module}.up.{leaf}"]
        else:
            outs = [name]
        for out in outs:
            if out not in state:
                raise RuntimeFailure(f"the trained model has no tensor '{out}' for checkpoint tensor '{name}'")
            tensor = state[out].detach()
            writer.add(out, tensor.to(dtype) if dtype is not None and tensor.is_floating_point() else tensor)
    writer.close()
    config = export.lowrank_config(ckpt.config, ranks, method) if ranks else dict(ckpt.config)
    if ranks:
        export.write_modeling_file(folder, ckpt.model_type)
    (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def run(model: str, opts, progress):
    import torch

    from lowrank_cli.api.finetune import default_checkpoint_dir
    from lowrank_cli.engine.streamed import build_empty_model, find_blocks
    from lowrank_cli.io.manifest import write_manifest
    from lowrank_cli.io.verify import verify_checkpoint
    from lowrank_cli.methods.decompose.targets import select_targets
    from lowrank_cli.methods.trp.callback import TRPCallback
    from lowrank_cli.methods.trp.factorize import replace_linears
    from lowrank_cli.methods.trp.optim import make_optimizer
    from lowrank_cli.modeling.export import load_model
    from lowrank_cli.train.curve import plot_curve, write_curve_jsonl
    from lowrank_cli.train.data import build_datasets, collate_fn
    from lowrank_cli.train.loop import resume_point, run_fingerprint, train

    timer = Timer()
    path = resolve_model(model)
    check_output_target(opts.output, overwrite=opts.overwrite, inputs=[path])
    check_device(opts.device)
    ckpt = Checkpoint(path)
    _check_base(model, ckpt)
    skeleton = build_empty_model(path)
    blocks_name, _ = find_blocks(skeleton)
    targets = select_targets(skeleton, blocks_name, opts.targets)  # UsageError when a pattern matches nothing
    del skeleton
    loop_config = opts.loop_config(opts.fingerprint(ckpt.fingerprint()))
    ckpt_dir = (Path(opts.checkpoint_dir).expanduser().resolve() if opts.checkpoint_dir
                else default_checkpoint_dir(opts.output))
    resume_from = resume_point(ckpt_dir, run_fingerprint(loop_config), resume=opts.resume,
                               save_every=opts.save_every, overwrite=opts.overwrite,
                               explicit_dir=bool(opts.checkpoint_dir))

    tokenizer = load_tokenizer(path)
    with timer("data"):
        world = int(os.environ.get("WORLD_SIZE", "1"))
        budget = (opts.max_steps * opts.batch_size * opts.grad_accum * opts.max_seq_len * world
                  if opts.max_steps else None)
        data = build_datasets(tokenizer, opts.data, opts.eval_data, text_field=opts.text_field,
                              max_seq_len=opts.max_seq_len, seed=opts.seed, token_budget=budget,
                              max_eval_examples=opts.max_eval_examples)
        windows = _perplexity_windows(tokenizer, opts, data)

    device = opts.device
    if device.startswith("cuda") and world > 1:
        from accelerate import PartialState

        device = str(PartialState().device)
    with timer("load"):
        net = load_model(path, dtype=torch.float32, device=device)
    names = [t.name for t in targets]
    modules = [(name, net.get_submodule(name)) for name in names]
    target_params = {id(p) for _, m in modules for p in m.parameters()}
    for p in net.parameters():
        p.requires_grad_(not opts.freeze_non_targets or id(p) in target_params)
    trainable = sum(p.numel() for p in net.parameters() if p.requires_grad)
    model_before = ckpt.num_params()
    targeted_before = sum(t.params for t in targets)

    with timer("eval"):
        ppl_before = _perplexity(net, windows.to(device), opts.batch_size)
    log.info("perplexity before training %.4f", ppl_before)

    trp = TRPCallback(modules, period=opts.period, energy=opts.energy, nuclear_weight=opts.nuclear_weight,
                      svd_method=opts.svd, seed=opts.seed)
    steps = StepTimer(trp.is_trp_step, cuda=device.startswith("cuda"))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    with timer("train"):
        optimizer = make_optimizer([p for p in net.parameters() if p.requires_grad], opts.optimizer, lr=opts.lr,
                                   weight_decay=opts.weight_decay)
        outcome = train(net, optimizer, data.train, config=loop_config, collate=collate_fn(pad),
                        eval_dataset=data.eval, callbacks=[steps, trp],
                        checkpoint_dir=ckpt_dir if opts.save_every else None, resume_from=resume_from,
                        progress=progress)
    net.eval()  # every process holds the whole model (single process or DDP): all factorize, one writes
    with timer("eval"):
        ppl_trained = _perplexity(net, windows.to(device), opts.batch_size)
    with timer("factorize"):
        if opts.final_rule == "threshold":
            chosen = replace_linears(net, names, threshold=opts.final_threshold)
        else:
            chosen = replace_linears(net, names, opts.final_energy, "exact" if opts.svd == "auto" else opts.svd)
        ppl_final = _perplexity(net, windows.to(device), opts.batch_size)
    ranks = {r.name: r.rank for r in chosen if r.factorized}
    targeted_after = sum(r.params_after for r in chosen)
    model_after = model_before - targeted_before + targeted_after
    params = {"model_before": model_before, "model_after": model_after, "model_ratio": model_after / model_before,
              "targeted_before": targeted_before, "targeted_after": targeted_after,
              "targeted_ratio": targeted_after / targeted_before, "targeted_layers": len(targets),
              "factorized_layers": len(ranks), "trainable": trainable}
    perplexity = {"before": ppl_before, "trained": ppl_trained, "final": ppl_final,
                  "eval_tokens": int(windows[:, 1:].numel()), "seq_len": opts.max_seq_len}
    full = {t.name: min(t.m, t.n) for t in targets}
    fractions = [sum(h["ranks"].values()) / sum(full.values()) for h in trp.history]
    history = {"trp_steps": len(trp.history), "first_rank_fraction": fractions[0] if fractions else None,
               "last_rank_fraction": fractions[-1] if fractions else None,
               "final_rank_fraction": sum(ranks.get(n, full[n]) for n in full) / sum(full.values())}
    overhead = steps.summary(trp.seconds, outcome.timings_s.get("train"))
    training = {"steps": outcome.steps, "tokens": outcome.tokens, "train_loss_final": outcome.final_train_loss,
                "optimizer": opts.optimizer, "lr": opts.lr, "nuclear_weight": opts.nuclear_weight,
                "eval_loss_before": outcome.initial_eval_loss, "eval_loss_after": outcome.final_eval_loss,
                "step_mean_s": outcome.timings_s.get("step_mean"), "mixed_precision": outcome.mixed_precision,
                "resumed_from_step": outcome.resumed_from_step}
    result = TRPResult(model=model, output=None, params=params, perplexity=perplexity, ranks=ranks,
                       dense_layers=[r.name for r in chosen if not r.factorized], rank_history=history,
                       overhead=overhead, training=training, timings_s=timer.seconds)
    if not outcome.is_main_process:
        return result

    out = OutputDir(opts.output, overwrite=opts.overwrite, inputs=[path])
    with out as tmp:
        with timer("write"):
            write_factorized(tmp, net, ckpt, ranks, opts.max_shard_size)
            for side in ckpt.side_files():
                shutil.copy2(side, tmp / side.name)
            with (tmp / "trp_ranks.jsonl").open("w") as fh:
                for row in trp.history:
                    fh.write(json.dumps(row) + "\n")
            plot_ranks(trp.history, full, tmp / "trp_ranks.png",
                       title=f"TRP e={opts.energy} period={opts.period} on {Path(model).name}")
            write_curve_jsonl(outcome.curve, tmp / "loss_curve.jsonl")
            plot_curve(outcome.curve, tmp / "loss_curve.png", initial_eval=outcome.initial_eval_loss,
                       title=f"trp-train on {Path(model).name}")
            verify_checkpoint(tmp)
        result.output = str(out.target)
        result.files = sorted(p.name for p in tmp.iterdir()) + ["lowrank.json"]
        write_manifest(tmp, command="trp-train", options=asdict(opts),
                       input_info={"model": model, "path": str(path), "fingerprint": ckpt.fingerprint()},
                       metrics={"params": params, "perplexity": perplexity, "overhead": overhead,
                                "training": training, "rank_history": history},
                       extra={"layers": [asdict(r) for r in chosen], "data": data.info,
                              "timings_s": timer.seconds})
        out.commit()
    if opts.save_every and not opts.checkpoint_dir:
        shutil.rmtree(ckpt_dir, ignore_errors=True)
    return result
