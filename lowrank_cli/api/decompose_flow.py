"""The steps of a decompose run (see `lowrank_cli.api.decompose` for the overview)."""

from __future__ import annotations

import logging
import math
import shutil
from pathlib import Path

from lowrank_cli.api.common import Timer, calibration_and_eval_windows, load_tokenizer
from lowrank_cli.engine.streamed import release_freed_memory
from lowrank_cli.errors import BudgetNotMet, UsageError
from lowrank_cli.io.manifest import write_manifest
from lowrank_cli.io.output import OutputDir
from lowrank_cli.io.verify import verify_checkpoint
from lowrank_cli.io.writer import ShardWriter, parse_size
from lowrank_cli.utils.memory import peak_rss_bytes

log = logging.getLogger("lowrank")


def _max_positions(config: dict) -> int | None:
    for key in ("max_position_embeddings", "n_positions", "seq_length"):
        if isinstance(config.get(key), int):
            return config[key]
    return None


def _curves(targets, profile, sensitivities):
    from lowrank_cli.methods.decompose.allocate import LayerCurve

    return [LayerCurve(t.name, t.m, t.n, profile.tails[t.name], sensitivities.get(t.name, 1.0))
            for t in targets]


def _allocate(opts, curves, keep: float) -> dict:
    from lowrank_cli.methods.decompose import allocate

    if opts.allocation == "uniform":
        return allocate.uniform_ranks(curves, keep, opts.rank_multiple)
    return allocate.allocate_ranks(curves, keep, opts.rank_multiple)


def _out_dtype(ckpt, name: str):
    import torch

    original = name
    for factor, dense in ((".down.weight", ".weight"), (".up.weight", ".weight"), (".up.bias", ".bias")):
        if name.endswith(factor) and name not in ckpt:
            original = name[: -len(factor)] + dense
    info = ckpt.tensors.get(original)
    return (info.float_dtype or torch.float32) if info is not None else None


def _predicted_increase(curves, ranks: dict, tokens: int) -> float:
    """Second-order estimate of the perplexity increase of an allocation: exp(mean dLoss) - 1, with
    dLoss = 1/2 * sensitivity * output error energy per layer (see methods/decompose/sensitivity.py)."""
    total = sum(0.5 * c.error(ranks.get(c.name)) for c in curves)
    return math.expm1(min(total / max(tokens, 1), 50.0))


def run(model: str, path: Path, ckpt, opts, progress):
    import torch

    from lowrank_cli.api.decompose import DecomposeResult
    from lowrank_cli.engine.streamed import StreamedModel, resolve_dtype
    from lowrank_cli.methods.decompose.plan import estimate_output_bytes, estimate_peak_bytes, plan_summary
    from lowrank_cli.methods.decompose.targets import select_targets

    timer = Timer()
    dtype = resolve_dtype(opts.dtype, opts.device)
    with timer("load"):
        streamed = StreamedModel(ckpt, device=opts.device, dtype=dtype, offload_dir=opts.offload_dir)
        targets = select_targets(streamed.model, streamed.blocks_name, opts.targets)
    limit = _max_positions(ckpt.config)
    if limit is not None and opts.calib_seq_len > limit:
        raise UsageError(f"--seq-len {opts.calib_seq_len} exceeds the model's {limit} positions")
    cfg = streamed.model.config
    fisher = opts.allocation == "fisher" and opts.budget_kind() != "rank"
    memory = estimate_peak_bytes(
        ckpt, streamed.blocks_name, streamed.num_blocks, targets, hidden=cfg.hidden_size,
        vocab=cfg.vocab_size, compute_bytes=torch.finfo(dtype).bits // 8,
        calib_tokens=opts.calib_samples * opts.calib_seq_len, eval_tokens=opts.eval_tokens,
        seq_len=opts.calib_seq_len, batch_size=opts.batch_size, fisher=fisher)
    memory["output"] = estimate_output_bytes(ckpt, targets, keep=opts.params_ratio, rank=opts.rank,
                                             multiple=opts.rank_multiple)
    targeted_before = sum(t.params for t in targets)
    model_before = ckpt.num_params()
    budget = {"kind": opts.budget_kind(), "value": getattr(opts, opts.budget_kind())
              if getattr(opts, opts.budget_kind()) is not None else 0.01}
    base = dict(model=model, method=opts.method, allocation=opts.allocation, budget=budget,
                plan=plan_summary(targets), memory=memory)
    if opts.dry_run:
        return DecomposeResult(
            output=None, dry_run=True, perplexity={}, ranks={}, dense_layers=[], evaluations=[],
            params={"model_before": model_before, "targeted_before": targeted_before,
                    "targeted_layers": len(targets)}, timings_s=timer.seconds, **base)

    tokenizer = load_tokenizer(path)
    with timer("data"):
        calib, evalw = calibration_and_eval_windows(tokenizer, opts)
    log.info("calibration %d x %d tokens, evaluation %d x %d tokens", *calib.shape, *evalw.shape)
    torch.manual_seed(opts.seed)

    from lowrank_cli.methods.decompose import allocate, passes, search
    from lowrank_cli.methods.decompose.sensitivity import output_sensitivities

    def block_task(label):
        task = progress.task(label, streamed.num_blocks)
        return task, (lambda: task.advance())

    with timer("profile"):
        task, tick = block_task("profile")
        need_curves = opts.allocation != "uniform" and opts.budget_kind() != "rank"
        profile = passes.profile_pass(streamed, calib, evalw, targets, method=opts.method, damp=opts.damp,
                                      batch_size=opts.batch_size, keep_boundaries=fisher, curves=need_curves,
                                      progress=tick)
        task.close()
    baseline = profile.baseline.perplexity
    log.info("baseline perplexity %.4f", baseline)
    sens = {}
    if fisher:
        with timer("sensitivity"):
            task, tick = block_task("sensitivity")
            sens = output_sensitivities(streamed, calib, profile.boundaries, targets, opts.batch_size, tick)
            task.close()
        for acts in profile.boundaries:
            acts.release()
        release_freed_memory()  # hand the boundaries back to the OS before the compress passes
    curves = _curves(targets, profile, sens)

    out = OutputDir(opts.output, overwrite=opts.overwrite, inputs=[path])
    evaluations: list[dict] = []
    with out as tmp:
        def evaluate(keep: float | None, ranks: dict):
            index = len(evaluations)
            folder = tmp / f".candidate-{index}"
            folder.mkdir()
            writer = ShardWriter(folder, parse_size(opts.max_shard_size))

            def sink(name, tensor):
                writer.add(name, tensor.to(_out_dtype(ckpt, name) or tensor.dtype))

            label = f"compress {index + 1}" + (f" keep={keep:.3f}" if keep is not None else "")
            task, tick = block_task(label)
            with timer("compress"):
                outcome = passes.compress_pass(streamed, calib, evalw, targets, ranks, method=opts.method,
                                               damp=opts.damp, sequential=opts.sequential,
                                               batch_size=opts.batch_size, dense=opts.format == "dense",
                                               sink=sink, progress=tick)
            task.close()
            for name in ckpt.names():
                if not name.startswith(streamed.blocks_name + "."):
                    writer.add(name, ckpt.get(name))
            writer.close()
            kept = allocate.kept_params(curves, ranks)
            ppl = outcome.nll.perplexity
            record = {"keep": keep, "kept_fraction": kept / targeted_before, "perplexity": ppl,
                      "increase": ppl / baseline - 1, "factorized_layers": len(outcome.layers),
                      "seconds": round(outcome.seconds, 2)}
            evaluations.append(record)
            log.info("evaluation %d: keep %s -> %.4f of targeted params, perplexity %.4f (%+.2f%%)",
                     index + 1, "-" if keep is None else f"{keep:.3f}", record["kept_fraction"], ppl,
                     record["increase"] * 100)
            return outcome, folder, record

        kind = opts.budget_kind()
        if kind == "rank":
            ranks = allocate.fixed_ranks(curves, opts.rank, opts.rank_multiple)
            outcome, folder, _ = evaluate(None, ranks)
        elif kind == "params_ratio":
            ranks = _allocate(opts, curves, opts.params_ratio)
            outcome, folder, _ = evaluate(opts.params_ratio, ranks)
        else:
            limit_ppl = baseline * (1 + budget["value"])
            results = {}

            def candidate(keep):
                ranks = _allocate(opts, curves, keep)
                outcome, folder, record = evaluate(keep, ranks)
                passed = math.isfinite(record["perplexity"]) and record["perplexity"] <= limit_ppl
                record["passed"] = passed and bool(outcome.layers)
                best = results.get("best")
                if record["passed"] and (best is None or record["kept_fraction"] < best[3]):
                    if best is not None:
                        shutil.rmtree(best[1])  # only the smallest passing model stays on disk
                    results["best"] = (outcome, folder, ranks, record["kept_fraction"])
                else:
                    shutil.rmtree(folder)
                return search.Candidate(keep, record["kept_fraction"], record["perplexity"], passed,
                                        len(outcome.layers))

            first = 0.8
            if fisher:
                first = search.first_guess(lambda k: _predicted_increase(curves, _allocate(opts, curves, k),
                                                                         int(calib.numel())), budget["value"])
                log.info("search starts at keep %.3f (Fisher-predicted increase within budget)", first)
            found = search.search_keep(candidate, steps=opts.search_steps, first=first)
            if found.best is None:
                closest = found.closest
                raise BudgetNotMet(
                    f"no compressed model met +{budget['value'] * 100:.3g}% perplexity (limit {limit_ppl:.4f}); "
                    f"closest: {closest.perplexity:.4f} keeping {closest.kept_fraction:.3f} of the targeted "
                    f"parameters after {len(found.tried)} evaluations; nothing was written",
                    hint="raise the budget, add calibration text, or narrow --targets",
                    details={"evaluations": evaluations, "baseline": baseline})
            outcome, folder, ranks, _ = results["best"]

        _finish(tmp, folder, ckpt, opts, ranks, outcome)
        final_ppl = outcome.nll.perplexity
        factored = {r["name"]: r["rank"] for r in outcome.layers}
        targeted_after = sum(r["params_after"] for r in outcome.layers) + sum(
            t.params for t in targets if t.name not in factored)
        model_after = model_before - targeted_before + targeted_after
        params = {"model_before": model_before, "model_after": model_after,
                  "model_ratio": model_after / model_before, "targeted_before": targeted_before,
                  "targeted_after": targeted_after, "targeted_ratio": targeted_after / targeted_before,
                  "targeted_layers": len(targets), "factorized_layers": len(factored)}
        perplexity = {"baseline": baseline, "final": final_ppl, "increase": final_ppl / baseline - 1,
                      "eval_tokens": outcome.nll.tokens, "calib_tokens": int(calib.numel())}
        memory["peak_resident_param_bytes"] = streamed.peak_resident_bytes
        memory["peak_rss_bytes"] = peak_rss_bytes()
        result = DecomposeResult(output=str(out.target), dry_run=False, params=params, perplexity=perplexity,
                                 ranks=factored, dense_layers=[t.name for t in targets if t.name not in factored],
                                 evaluations=evaluations, timings_s=timer.seconds, **base)
        verify_checkpoint(tmp)
        write_manifest(tmp, command="decompose", options=vars(opts),
                       input_info={"model": model, "path": str(path), "fingerprint": ckpt.fingerprint()},
                       metrics={"params": params, "perplexity": perplexity, "evaluations": evaluations},
                       extra={"layers": outcome.layers, "sensitivity": sens, "timings_s": timer.seconds})
        out.commit()
    return result


def _finish(tmp: Path, folder: Path, ckpt, opts, ranks: dict, outcome) -> None:
    """Move the chosen candidate's shards into place, drop the others, write config and side files."""
    import json

    from lowrank_cli.modeling import export

    for item in folder.iterdir():
        shutil.move(str(item), tmp / item.name)
    for other in tmp.glob(".candidate-*"):
        shutil.rmtree(other)
    factored = {r["name"]: r["rank"] for r in outcome.layers}
    config = dict(ckpt.config)
    if opts.format == "factorized" and factored:
        config = export.lowrank_config(config, factored, opts.method)
        export.write_modeling_file(tmp, ckpt.model_type)
    (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    for side in ckpt.side_files():
        shutil.copy2(side, tmp / side.name)
