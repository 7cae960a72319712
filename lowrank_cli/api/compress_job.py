"""The steps of a compress run (see `lowrank_cli.api.compress` for the overview)."""

from __future__ import annotations

import logging
import math
import shutil
from pathlib import Path
from types import SimpleNamespace

from lowrank_cli.api.common import load_tokenizer, solver_windows
from lowrank_cli.api.compress_result import FRONTIER_JSON, FRONTIER_PNG, CompressResult
from lowrank_cli.api.options.compress import NOISE_EXPONENT, CompressOptions
from lowrank_cli.api.solver import SolverJob
from lowrank_cli.errors import BudgetNotMet, UsageError
from lowrank_cli.io.output import OutputDir
from lowrank_cli.methods.compress.plan import DEFAULT_BITS, DEFAULT_KEEPS, Spec, candidate_specs

__all__ = ["CompressJob", "parse_target_size"]

log = logging.getLogger("lowrank")
RANK_MULTIPLE = 32  # GPTQ packs 32 levels per int32 word along each factor's rank dimension
# The per-window standard error treats windows as independent draws; windows cut from one document are not.
# Measured on SmolLM2 (benchmarks/eval_noise.py, GPTQ 4-bit vs base on disjoint window sets of the eval
# part): the spread of the paired ratio across sets was 3.6x the formula at 4096 tokens, 2.7x at 8192 and
# 16384. The budget check inflates the formula by this factor.
WINDOW_CORRELATION = 3.0
# Pruning (--prune): a candidate stops once the second-order estimate of its perplexity increase, summed over
# the blocks done so far (each layer's output error energy x its Fisher sensitivity, as decompose predicts a
# keep), exceeds this multiple of the budget. The running sum only grows, so it stops the candidates that are
# clearly out early. Measured (--no-prune runs, measured / predicted eval increase, default candidates):
# SmolLM2 0.93-2.30 (benchmarks/results/pipeline_speed-smollm2-compress-no-prune.json; 2-bit candidates that
# diverge are under-predicted by orders of magnitude, the safe side), the demo model 0.39-0.90 where the
# increase stands above the noise (>= 0.5%; pipeline_speed-demo-compress.json; below, e.g. +0.06% measured
# against +0.32% predicted, the ratio is noise). A pruned candidate could only have met the budget with a ratio
# below 1 / PRUNE_FACTOR = 0.25: under anything measured above the noise.
PRUNE_FACTOR = 4.0


def parse_target_size(text: str, input_bytes: int) -> int:
    """'60MB' / '1.5GB' / '123456' (bytes) or '0.3' / '30%' (of the input's weight bytes) -> bytes."""
    from lowrank_cli.io.writer import parse_size

    raw = str(text).strip()
    try:
        if raw.endswith("%"):
            return int(float(raw[:-1]) / 100 * input_bytes)
        value = float(raw)
        if 0 < value < 1:
            return int(value * input_bytes)
        if value >= 1 and raw.replace(".", "", 1).isdigit():
            return int(value)
    except ValueError:
        pass
    try:
        return parse_size(raw)
    except (UsageError, ValueError) as exc:
        raise UsageError(f"--target-size '{text}': give bytes ('60MB', '1.5GB') or a fraction of the input's "
                         "weight bytes ('0.3', '30%')") from exc


class CompressJob(SolverJob):
    """plan -> profile pass -> candidates pass -> choice (-> healing) -> write."""

    def __init__(self, model: str, path, ckpt, opts: CompressOptions, progress):
        from lowrank_cli.api.quantize import check_packable

        super().__init__(model, path, ckpt, opts, progress)
        families = opts.chosen_families()
        if any(f != "factorize" for f in families):
            check_packable(ckpt, self.targets)
        self.specs = candidate_specs(families, opts.bits or DEFAULT_BITS, opts.keeps or DEFAULT_KEEPS,
                                     opts.correction_rank)
        if not self.specs:
            raise UsageError("the chosen --families and --bits leave no candidate (factorize-gptq tries 3 and 4 "
                             "bits, gptq-lr 2 and 3)")
        self.input_bytes = ckpt.total_bytes()
        self.params = ckpt.num_params()
        kind = opts.budget_kind()
        self.budget = {"kind": kind}
        if kind == "target_size":
            self.budget.update(value=opts.target_size, limit_bytes=parse_target_size(opts.target_size,
                                                                                     self.input_bytes))
        else:
            self.budget["value"] = opts.target_ppl_increase if opts.target_ppl_increase is not None else 0.01
        self.curves = None
        self.sens: dict = {}
        self.pruning = opts.prune and kind == "target_ppl_increase"
        # name -> [n, seq] windows: further texts every candidate is measured on and reported with (never
        # read by the choice); benchmarks/frontier.py adds English prose beside the default code
        self.extra_tests: dict = {}

    # -- pricing ---------------------------------------------------------------------------------------------
    def _ranks(self, keep: float) -> dict:
        from lowrank_cli.methods.decompose import allocate

        if self.curves is None or self.opts.allocation == "uniform":
            curves = self.curves or self._flat_curves()
            return allocate.uniform_ranks(curves, keep, RANK_MULTIPLE)
        return allocate.allocate_ranks(self.curves, keep, RANK_MULTIPLE)

    def _flat_curves(self):
        import torch

        from lowrank_cli.methods.decompose.allocate import LayerCurve

        return [LayerCurve(t.name, t.m, t.n, torch.zeros(min(t.m, t.n) + 1)) for t in self.targets]

    def _price(self, spec: Spec) -> int:
        from lowrank_cli.methods.quantize.plan import quantized_checkpoint_bytes

        gs = self.opts.group_size
        if spec.keep is not None:
            spec.extra["ranks"] = self._ranks(spec.keep)
        if spec.family in ("gptq", "factorize-gptq"):
            return quantized_checkpoint_bytes(self.ckpt, self.targets, spec.bits, gs, spec.extra.get("ranks"))
        if spec.family == "gptq-lr":
            adapter = sum(spec.rank * (t.m + t.n) * 2 for t in self.targets)  # float16 L and R
            return quantized_checkpoint_bytes(self.ckpt, self.targets, spec.bits, gs) + adapter
        ranks = spec.extra["ranks"]  # factorize, written in 16 bits
        weights = {t.name + ".weight": t for t in self.targets}
        total = 0
        for name, info in self.ckpt.tensors.items():
            t = weights.get(name)
            r = ranks.get(t.name) if t is not None else None
            numel = r * (t.m + t.n) if r is not None else info.numel
            total += numel * 2 if info.float_dtype is not None else info.nbytes
        return total

    def _priced(self) -> list[Spec]:
        priced = []
        for spec in self.specs:
            try:
                spec.bytes = self._price(spec)
            except UsageError as exc:  # a keep below what ranks in multiples of 32 can reach
                log.warning("%s dropped: %s", spec.label, exc.message)
                continue
            priced.append(spec)
        if not priced:
            raise UsageError("no candidate can be built: every --keeps is below what this model's layers reach")
        limit = self.budget.get("limit_bytes")
        if limit is None:
            return priced
        fits = [s for s in priced if s.bytes <= limit]
        if not fits:
            smallest = min(priced, key=lambda s: s.bytes)
            raise BudgetNotMet(f"no candidate fits {limit / 2**20:.1f} MiB: the smallest, {smallest.label}, takes "
                               f"{smallest.bytes / 2**20:.1f} MiB; nothing was run or written",
                               hint="raise --target-size or add --bits 2")
        return fits

    def _spec_row(self, spec: Spec) -> dict:
        return {"label": spec.label, "family": spec.family, "bits": spec.bits, "keep": spec.keep, "rank": spec.rank,
                "bytes": spec.bytes, "bits_per_weight": spec.bytes * 8 / self.params}

    def _cost(self, n: int) -> dict:
        """Token-forwards of the two passes, and their multiple of one profile pass (an upper bound with
        --prune: a pruned candidate stops early)."""
        o = self.opts
        calib = o.calib_samples * o.calib_seq_len
        profile = calib + o.eval_tokens + o.test_tokens
        # without --sequential the candidates share one stream, or none when the profile's Grams are kept
        calib_share = calib * n if o.sequential else (0 if self._keeps_grams() else calib)
        # Fisher sensitivities: one forward and one backward over the calibration text (a backward ~ 2 forwards)
        fisher = 3 * calib if (o.allocation == "fisher" and any(s.keep is not None for s in self.specs)
                               or self.pruning) else 0
        total = profile + fisher + calib_share + n * (o.eval_tokens + o.test_tokens)
        return {"token_forwards": total, "vs_one_pass": total / profile, "candidates": n}

    def plan_only(self) -> CompressResult:
        specs = self._priced()
        rows = [self._spec_row(s) for s in sorted(specs, key=lambda s: s.bytes)]
        for row in rows:
            if row["keep"] is not None:
                row["bytes_kind"] = f"estimate (uniform ranks; the run allocates by {self.opts.allocation})"
        baseline = {"bytes": self.input_bytes, "cost": self._cost(len(specs))}
        return CompressResult(model=self.model, output=None, dry_run=True, budget=self.budget, chosen=None,
                              candidates=rows, baseline=baseline, timings_s=self.timer.seconds)

    # -- the run ---------------------------------------------------------------------------------------------
    def run(self) -> CompressResult:
        import torch

        with self.timer("data"):
            self.windows = solver_windows(load_tokenizer(self.path), self.opts)
        torch.manual_seed(self.opts.seed)
        self.baseline = self._profile()
        specs = self._priced()
        out = OutputDir(self.opts.output, overwrite=self.opts.overwrite, inputs=[self.path])
        with out as tmp:
            records = self._candidates(tmp, specs)
            self._check_resolution(records)
            chosen = self._choose(records)
            if self.opts.heal_steps:
                chosen = self._heal(tmp, chosen, records)
            result = self._write(tmp, chosen, records)
            result.output = str(out.target)
            out.commit()
        return result

    def _evalsets(self) -> dict:
        """eval (the choice), test (the report), and any further report-only texts (`extra_tests`)."""
        return {"eval": self.windows.eval, "test": self.windows.test, **self.extra_tests}

    def _profile(self) -> dict:
        """Baseline eval/test perplexity and, for the factorizing families, the layers' error curves (weighed
        by Fisher sensitivities under the default allocation, as decompose does)."""
        from lowrank_cli.engine.sequential import Candidate, run_pipeline
        from lowrank_cli.methods.decompose.allocate import LayerCurve

        curves = self._profile_curves()
        # the sensitivities also price every candidate's error (the predictions behind --prune)
        fisher = (curves and self.opts.allocation == "fisher") or self.pruning
        self.gram_store = self.make_gram_store(self._candidate_products()) if self._keeps_grams() else None
        profiler = self.profiler("lord", curves, store=self.gram_store)
        with self.timer("profile"):
            task = self.progress.task("profile", self.streamed.num_blocks)
            outcome = run_pipeline(self.streamed, self.windows.calib, self._evalsets(), self.targets,
                                   [Candidate("profile", profiler)], sequential=False, batch_size=self.opts.batch_size,
                                   keep_boundaries=fisher, progress=task.advance, gram_store=self.gram_store)
            task.close()
        nll, _, _ = outcome.only()
        sens = self.sensitivities(self.windows.calib, outcome.boundaries) if fisher else {}
        self.sens = sens
        if curves:
            weight = sens if self.opts.allocation == "fisher" else {}  # "error": every layer's error alike
            self.curves = [LayerCurve(t.name, t.m, t.n, profiler.tails[t.name], weight.get(t.name, 1.0))
                           for t in self.targets]
        log.info("baseline perplexity: eval %.4f, test %.4f", nll["eval"].perplexity, nll["test"].perplexity)
        self.base_rows = {name: v.per_window for name, v in nll.items()}
        extra = {f"{name}_perplexity": nll[name].perplexity for name in self.extra_tests}
        return {"eval": nll["eval"].perplexity, "test": nll["test"].perplexity, "bytes": self.input_bytes,
                "eval_tokens": nll["eval"].tokens, "test_tokens": nll["test"].tokens,
                "calib_tokens": int(self.windows.calib.numel()), **extra}

    def _grid(self, bits: int) -> SimpleNamespace:
        o = self.opts
        return SimpleNamespace(bits=bits, group_size=o.group_size, sym=o.sym, act_order=o.act_order, damp=o.damp,
                               method="gptq", true_sequential=o.sequential)

    def _profile_curves(self) -> bool:
        return any(s.keep is not None for s in self.specs) and self.opts.allocation != "uniform"

    def _keeps_grams(self) -> bool:
        """Whether the profile keeps its Grams for the candidates pass: they share one calibration stream through
        the original blocks (no --sequential), so the profile's Grams, taken with the candidates' products,
        spare that pass the stream; when they fit (`SolverJob.grams_fit`)."""
        return self._profile_curves() and not self.opts.sequential and self.grams_fit()

    def _candidate_products(self):
        """The Gram products the candidates pass takes: float32 when every candidate's modifier accepts them."""
        from lowrank_cli.methods.compress.correction import QuantizeWithCorrection
        from lowrank_cli.methods.compress.modifiers import FactorizeThenQuantize
        from lowrank_cli.methods.decompose.modifier import Factorize
        from lowrank_cli.methods.quantize.modifier import Quantize

        kinds = {"gptq": Quantize, "factorize-gptq": FactorizeThenQuantize, "factorize": Factorize,
                 "gptq-lr": QuantizeWithCorrection}
        products = {kinds[spec.family].product_dtype for spec in self.specs}
        return products.pop() if len(products) == 1 else None

    def _modifier(self, spec: Spec):
        from lowrank_cli.methods.compress.modifiers import FactorizeThenQuantize
        from lowrank_cli.methods.decompose.modifier import Factorize
        from lowrank_cli.methods.quantize.grid import Grid
        from lowrank_cli.methods.quantize.modifier import Quantize

        o = self.opts
        quantize = Quantize(Grid(spec.bits, o.group_size, o.sym), damp=o.damp, act_order=o.act_order,
                            compare_rtn=False) if spec.bits is not None else None
        if spec.family == "gptq":
            return quantize
        if spec.family == "factorize-gptq":
            return FactorizeThenQuantize(Factorize(spec.extra["ranks"], "lord", o.damp), quantize)
        if spec.family == "factorize":
            return Factorize(spec.extra["ranks"], "lord", o.damp)
        from lowrank_cli.methods.compress.correction import QuantizeWithCorrection

        return QuantizeWithCorrection(quantize, spec.rank, damp=o.damp)

    def _candidates(self, tmp: Path, specs: list[Spec]) -> list[dict]:
        """Every candidate in one streamed pass, each written to its own folder; their records."""
        from lowrank_cli.engine.sequential import Candidate, run_pipeline
        from lowrank_cli.io.finish import copy_outer_tensors
        from lowrank_cli.io.writer import ShardWriter, parse_size

        runs = []
        for spec in specs:
            folder = tmp / f".candidate-{spec.label}"
            folder.mkdir()
            writer = ShardWriter(folder, parse_size(self.opts.max_shard_size))
            runs.append((spec, folder, writer, Candidate(spec.label, self._modifier(spec), _float16_sink(writer),
                                                         track_energy=bool(self.sens))))
        log.info("%d candidates: %s", len(runs), ", ".join(s.label for s in specs))
        with self.timer("candidates"):
            task = self.progress.task(f"{len(runs)} candidates", self.streamed.num_blocks)
            outcome = run_pipeline(self.streamed, self.windows.calib, self._evalsets(), self.targets,
                                   [r[3] for r in runs], sequential=self.opts.sequential,
                                   batch_size=self.opts.batch_size, progress=task.advance,
                                   prune=self._prune if self.pruning else None, gram_store=self.gram_store)
            task.close()
        records = []
        with self.timer("write"):
            for spec, folder, writer, cand in runs:
                predicted = self._predicted_increase(outcome.layers[cand.name])
                if cand.name in outcome.dropped:
                    shutil.rmtree(folder)
                    records.append(self._pruned_record(spec, outcome.dropped[cand.name], predicted,
                                                       outcome.seconds[cand.name]))
                    continue
                copy_outer_tensors(self.ckpt, self.streamed.blocks_name, cand.sink)
                writer.close()
                self._complete(spec, folder, cand.modifier, outcome.layers[cand.name])
                record = self._record(spec, folder, outcome.nll[cand.name], outcome.seconds[cand.name])
                record["predicted_increase"] = predicted
                records.append(record)
        return records

    # -- predictions and pruning -----------------------------------------------------------------------------
    def _predicted_increase(self, layers: list[dict]) -> float | None:
        """Second-order estimate of the eval perplexity increase from the layers changed so far:
        exp(sum 1/2 s_l E_l / T) - 1, with E_l the layer's output error energy over the T calibration tokens
        and s_l its Fisher sensitivity (the estimate decompose prices ranks with). None without sensitivities."""
        if not self.sens:
            return None
        loss = sum(0.5 * self.sens.get(r["name"], 0.0) * r["output_energy"] for r in layers if "output_energy" in r)
        return math.expm1(min(loss / max(int(self.windows.calib.numel()), 1), 50.0))

    def _prune(self, cand, block: int) -> bool:
        predicted = self._predicted_increase(cand.layers)
        return predicted is not None and predicted > PRUNE_FACTOR * self.budget["value"]

    def _pruned_record(self, spec: Spec, block: int, predicted: float, seconds: float) -> dict:
        """A candidate --prune stopped: no folder, no perplexity; its estimate so far (a running sum that only
        grows, so a lower estimate of the whole model's) and where it stopped."""
        row = self._spec_row(spec)
        row.update(predicted_bytes=spec.bytes, seconds=round(seconds, 2), healed=False, eval_perplexity=None,
                   test_perplexity=None, predicted_increase=predicted,
                   pruned={"after_block": block, "of_blocks": self.streamed.num_blocks,
                           "threshold": PRUNE_FACTOR * self.budget["value"]})
        log.info("%-28s %8.2f MiB  pruned after block %d: predicted %+.1f%%", row["label"], spec.bytes / 2**20,
                 block, predicted * 100)
        return row

    def _complete(self, spec: Spec, folder: Path, modifier, layers: list[dict]) -> None:
        """config.json (+ modeling file, + correction adapter), side files, verification."""
        from lowrank_cli.api.quantize import quantized_config
        from lowrank_cli.io.finish import complete_folder
        from lowrank_cli.modeling import export

        config = dict(self.ckpt.config)
        factored = {r["name"]: r["rank"] for r in layers if r.get("rank") is not None}
        targets = self.targets
        if factored:
            config = export.lowrank_config(config, factored, "lord")
            export.write_modeling_file(folder, self.ckpt.model_type)
            targets = _factor_targets(self.targets, factored)
        if spec.bits is not None:
            config = quantized_config(config, self._grid(spec.bits), targets, folder)
        else:
            config["dtype"] = "float16"
            config.pop("torch_dtype", None)
        if spec.family == "gptq-lr":
            from lowrank_cli.io.gptq_view import CORRECTION_DIR
            from lowrank_cli.io.lora_adapter import write_lora_adapter

            write_lora_adapter(folder / CORRECTION_DIR, modifier.factors, "..", dtype=modifier.store_dtype)
        complete_folder(folder, self.ckpt, config)

    def _record(self, spec: Spec, folder: Path, nll: dict, seconds: float) -> dict:
        row = self._spec_row(spec)
        row.update(predicted_bytes=spec.bytes, seconds=round(seconds, 2), healed=False, pruned=None)
        return self._measured(row, folder, nll)

    def _measured(self, row: dict, folder: Path, nll: dict) -> dict:
        """The row with the folder's sizes (files on disk; tensor bytes) and its eval/test perplexity."""
        from lowrank_cli.io.checkpoint import Checkpoint
        from lowrank_cli.io.finish import weight_file_bytes

        parts = [folder, *(p for p in folder.iterdir() if p.is_dir())]
        size = sum(weight_file_bytes(p) for p in parts)
        tensor_bytes = Checkpoint(folder).total_bytes() + sum(_safetensors_bytes(p) for p in parts[1:])
        from lowrank_cli.eval.noise import ppl_noise

        ev, te = nll["eval"].perplexity, nll["test"].perplexity
        se = {name: ppl_noise(nll[name].per_window, self.opts.calib_seq_len - 1, self.base_rows[name]).ratio_relative_se
              for name in ("eval", "test")}
        row.update(tensor_bytes=tensor_bytes, bytes=size, bits_per_weight=size * 8 / self.params,
                   eval_perplexity=ev, test_perplexity=te, eval_increase=ev / self.baseline["eval"] - 1,
                   test_increase=te / self.baseline["test"] - 1, eval_increase_se=se["eval"],
                   test_increase_se=se["test"], folder=str(folder),
                   **{f"{name}_perplexity": nll[name].perplexity for name in self.extra_tests})
        log.info("%-28s %8.2f MiB  eval %.4f (%+.2f%%)  test %.4f", row["label"], size / 2**20, ev,
                 row["eval_increase"] * 100, te)
        return row

    # -- choice and output -----------------------------------------------------------------------------------
    def _passes(self, row: dict) -> bool:
        if row.get("pruned"):
            return False
        if self.budget["kind"] == "target_size":
            return row["bytes"] <= self.budget["limit_bytes"] and math.isfinite(row["eval_perplexity"])
        limit = self.baseline["eval"] * (1 + self.budget["value"])
        return math.isfinite(row["eval_perplexity"]) and row["eval_perplexity"] <= limit

    def _check_resolution(self, records: list[dict]) -> None:
        """A perplexity budget the eval text cannot resolve is bad input. Each candidate near the budget
        gives the paired standard error of its own increase, times WINDOW_CORRELATION; a larger increase's
        is carried down to the budget's size with the measured law (spread grows as increase^0.765, see
        options/compress.py: the rule checked before the run; smaller ones are taken as they are, which
        errs toward refusing), and the median must stay below half the budget.
        Without the carry, a +10% candidate's noise would be held against a 5% budget: on SmolLM2 that
        refused, after the whole pass, a budget the up-front rule had let through."""
        import statistics

        if self.budget["kind"] != "target_ppl_increase":
            return
        budget = self.budget["value"]
        measured = [r for r in records if not r.get("pruned") and math.isfinite(r["eval_increase_se"])]
        near = [r for r in measured if budget / 3 <= r["eval_increase"] <= 3 * budget]
        pool = near or measured
        if not pool:
            return
        noise = WINDOW_CORRELATION * statistics.median(
            r["eval_increase_se"] * min(1.0, budget / max(r["eval_increase"], 1e-12)) ** NOISE_EXPONENT for r in pool)
        self.budget["eval_noise"] = noise
        if budget < 2 * noise:
            raise UsageError(f"--target-ppl-increase {budget * 100:.3g}% is below what {self.baseline['eval_tokens']} "
                             f"eval tokens resolve (paired standard error of an increase this size here: "
                             f"{noise * 100:.2g}%); raise --eval-tokens or the budget; nothing was written")

    def _choose(self, records: list[dict]) -> dict:
        """Decided on eval perplexity and bytes only: the test text never steers the choice."""
        for row in records:
            row["passed"] = self._passes(row)
        passed = [r for r in records if r["passed"]]
        if self.budget["kind"] == "target_size":
            best = min(passed, key=lambda r: (r["eval_perplexity"], r["bytes"]), default=None)
        else:
            best = min(passed, key=lambda r: (r["bytes"], r["eval_perplexity"]), default=None)
        if best is None:
            closest = sorted((r for r in records if not r.get("pruned")), key=lambda r: r["eval_perplexity"])[:3]
            listed = "; ".join(f"{r['label']} {r['bytes'] / 2**20:.1f} MiB eval {r['eval_perplexity']:.4f} "
                               f"({r['eval_increase'] * 100:+.2f}%)" for r in closest)
            if not closest:  # every candidate pruned
                listed = "every candidate pruned, least predicted: " + "; ".join(
                    f"{r['label']} {r['predicted_increase'] * 100:+.1f}%"
                    for r in sorted(records, key=lambda r: r["predicted_increase"])[:3])
            limit = f"+{self.budget['value'] * 100:.3g}%" if "limit_bytes" not in self.budget else \
                f"{self.budget['limit_bytes'] / 2**20:.1f} MiB"
            raise BudgetNotMet(f"no candidate met {limit} (baseline eval {self.baseline['eval']:.4f}); closest: "
                               f"{listed}; nothing was written", hint="raise the budget or add --families/--bits",
                               details={"candidates": [_public(r) for r in records], "baseline": self.baseline})
        log.info("chosen: %s (%.2f MiB)", best["label"], best["bytes"] / 2**20)
        return best

    def _heal(self, tmp: Path, chosen: dict, records: list[dict]) -> dict:
        from lowrank_cli.api.compress_heal import heal_candidates

        with self.timer("heal"):
            healed = heal_candidates(self, tmp, chosen, records)
        records.extend(healed)
        return self._choose(records)

    def _write(self, tmp: Path, chosen: dict, records: list[dict]) -> CompressResult:
        from lowrank_cli.io.frontier import write_frontier
        from lowrank_cli.io.manifest import write_manifest

        folder = Path(chosen["folder"])
        for item in folder.iterdir():
            shutil.move(str(item), tmp / item.name)
        for other in tmp.glob(".candidate-*"):
            shutil.rmtree(other)
        from lowrank_cli.utils.frontier_plot import pareto_indices

        rows = sorted((_public(r) for r in records), key=lambda r: r["bytes"])
        public = _public(chosen)
        measured = [i for i, r in enumerate(rows) if not r.get("pruned")]
        front = [measured[i] for i in pareto_indices([{**rows[i], "test_ppl": rows[i]["test_perplexity"]}
                                                      for i in measured])]
        doc = {"schema": "lowrank.frontier/v1", "model": self.model, "budget": self.budget,
               "baseline": self.baseline, "chosen": public["label"], "candidates": rows,
               "pareto_test": [rows[i]["label"] for i in front],
               "note": "the choice reads eval perplexity and bytes only; test perplexity is reported"}
        write_frontier(tmp / FRONTIER_JSON, tmp / FRONTIER_PNG, doc)
        write_manifest(tmp, command="compress", options=vars(self.opts),
                       input_info={"model": self.model, "path": str(self.path), "fingerprint": self.ckpt.fingerprint()},
                       metrics={"chosen": public, "baseline": self.baseline, "budget": self.budget},
                       extra={"candidates": rows, "timings_s": self.timer.seconds, "precision": self.precision})
        return CompressResult(model=self.model, output=None, dry_run=False, budget=self.budget, chosen=public,
                              candidates=rows, baseline=self.baseline, timings_s=self.timer.seconds,
                              precision=self.precision)


def _public(row: dict) -> dict:
    return {k: v for k, v in row.items() if k != "folder"}


def _safetensors_bytes(folder: Path) -> int:
    """Tensor bytes (headers excluded) of every safetensors file in a folder."""
    from lowrank_cli.io.checkpoint import read_header

    total = 0
    for path in folder.glob("*.safetensors"):
        total += sum(end - start for name, meta in read_header(path).items() if name != "__metadata__"
                     for start, end in [meta["data_offsets"]])
    return total


def _float16_sink(writer):
    """Floats in 16 bits (the size compress searches on), integer (packed) tensors as they are."""
    import torch

    def sink(name, tensor):
        writer.add(name, tensor.to(torch.float16) if tensor.is_floating_point() else tensor)

    return sink


def _factor_targets(targets, factored: dict):
    """The linears of a factorized model: NAME.down (r x n) and NAME.up (m x r) for factored targets."""
    from lowrank_cli.engine.targets import Target

    out = []
    for t in targets:
        r = factored.get(t.name)
        if r is None:
            out.append(t)
            continue
        out.append(Target(t.name + ".down", t.block, t.local + ".down", r, t.n, False))
        out.append(Target(t.name + ".up", t.block, t.local + ".up", t.m, r, t.bias))
    return out

