"""`lowrank decompose`: low-rank compression of a checkpoint's linear layers under a budget.

The per-layer factorization is LoRD's (data-aware, one-shot); the Fisher allocation, the sequential
calibration (Grams measured on the compressed model's own activations, which re-measures the inputs but
does not compensate upstream error) and the perplexity-budget search are this project's additions.

Flow (every model pass streams one decoder block at a time):
  1. profile: the original model over calibration text -> each layer's error-versus-rank curve, and over
     evaluation text -> the baseline perplexity;
  2. sensitivity (allocation "fisher"): one streamed backward pass -> loss per unit of output error;
  3. allocation: ranks from the curves for a kept-parameter fraction (or one rank everywhere);
  4. compress: factorize block by block (sequential calibration) while measuring perplexity; for
     --target-ppl-increase, a search over the kept fraction repeats this step a few times, each pass
     evaluating --search-width kept fractions (one read of the blocks serves them all);
  5. write the winner: shards, config (+ modeling file), side files, manifest; rename into place.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from lowrank_cli.api.common import load_tokenizer, solver_windows
from lowrank_cli.api.options.decompose import ALLOCATIONS, FORMATS, METHODS, DecomposeOptions
from lowrank_cli.api.solver import SolverJob, open_input
from lowrank_cli.errors import UsageError
from lowrank_cli.io.output import OutputDir
from lowrank_cli.result import Result
from lowrank_cli.utils.progress import Progress

__all__ = ["DecomposeOptions", "DecomposeResult", "decompose", "METHODS", "ALLOCATIONS", "FORMATS"]


@dataclass
class DecomposeResult(Result):
    model: str
    output: str | None
    method: str
    allocation: str
    budget: dict
    dry_run: bool
    params: dict  # model-level and targeted-layer counts, before and after
    perplexity: dict  # baseline, final, increase, budget limit
    ranks: dict  # module -> rank (dense modules omitted)
    dense_layers: list
    evaluations: list  # one entry per full evaluation (the search's history)
    plan: list  # layer kinds, shapes, break-even ranks
    memory: dict  # estimated peak bytes by component; measured peaks
    timings_s: dict = field(default_factory=dict)
    precision: dict = field(default_factory=dict)  # dtype of each pass: compute, sensitivity, profile Gram products

    def summary(self):
        p, q = self.params, self.perplexity
        rows = [("model", self.model), ("method", f"{self.method} ({self.allocation} allocation)")]
        if self.dry_run:
            rows += [("dry run", "nothing written"), ("targeted layers", p.get("targeted_layers")),
                     ("targeted params", p.get("targeted_before")), ("model params", p.get("model_before")),
                     ("est. peak memory", f"{self.memory.get('total', 0) / 2**20:.1f} MiB"),
                     ("est. output size", f"{self.memory['output']['bytes'] / 2**20:.1f} MiB "
                                          f"({self.memory['output']['kind']})")]
            rows += [(f"  {r['layer']} x{r['count']}", f"{r['shape'][0]}x{r['shape'][1]}, break-even rank "
                      f"{r['break_even_rank']}") for r in self.plan]
            return rows
        rows += [
            ("output", self.output),
            ("model params", f"{p['model_before']:,} -> {p['model_after']:,} ({p['model_ratio']:.3f})"),
            ("targeted params", f"{p['targeted_before']:,} -> {p['targeted_after']:,} "
                                f"({p['targeted_ratio']:.3f})"),
            ("factorized layers", f"{len(self.ranks)} of {p['targeted_layers']}"),
            ("perplexity (eval)", f"{q['baseline']:.4f} -> {q['final']:.4f} ({q['increase'] * 100:+.2f}%)"),
            ("perplexity (test)", f"{q['test_baseline']:.4f} -> {q['test_final']:.4f} "
                                  f"({q['test_increase'] * 100:+.2f}%)"),
            ("evaluations", f"{len(self.evaluations)} in "
                            f"{len({e.get('pass') for e in self.evaluations})} streamed passes"),
            ("time", f"{sum(self.timings_s.values()):.1f} s"),
        ]
        return rows


def decompose(model: str, opts: DecomposeOptions | None = None, progress: Progress | None = None,
              **overrides) -> DecomposeResult:
    """Compress MODEL; see DecomposeOptions. Raises UsageError (2) or BudgetNotMet (3)."""
    opts, path, ckpt = open_input(model, opts or DecomposeOptions(), overrides,
                                  refuse_quantized="decompose a full-precision checkpoint, then quantize the result")
    job = _Job(model, path, ckpt, opts, progress or Progress())
    return job.plan_only() if opts.dry_run else job.run()


# Sequential calibration's measured worth (SmolLM2, Fisher allocation, test perplexity; `python
# benchmarks/decompose_quality.py --model smollm2 --keep 0.6 0.8 0.9 --configs lord-fisher lord-fisher-noseq`):
# 19.47 sequential vs 22.76 at kept 0.6, 9.09 vs 9.10 at 0.8, 7.12 vs 7.16 at 0.9. By default a compress pass
# calibrates sequentially when a kept fraction it evaluates is below this; otherwise its layers take the input
# model's Grams, kept from the profile pass (GramStore), at about a third of the pass's cost.
SEQUENTIAL_BELOW = 0.75


def _out_dtype(ckpt, name: str):
    """The float dtype the input stores a tensor (or the weight a factor came from) in."""
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
    import math

    total = sum(0.5 * c.error(ranks.get(c.name)) for c in curves)
    return math.expm1(min(total / max(tokens, 1), 50.0))


class _Job(SolverJob):
    """One decompose run: plan -> profile (+ sensitivity) -> compress (searched or fixed) -> write."""

    def __init__(self, model: str, path, ckpt, opts: DecomposeOptions, progress: Progress):
        super().__init__(model, path, ckpt, opts, progress, patterns=opts.targets)
        self.kind = opts.budget_kind()
        self.fisher = opts.allocation == "fisher" and self.kind != "rank"
        value = getattr(opts, self.kind)
        self.budget = {"kind": self.kind, "value": value if value is not None else 0.01}
        self.targeted_before = sum(t.params for t in self.targets)
        if opts.method != "svd":
            self.precision["factor_gram_products"] = opts.gram_products
        if self.kind == "rank":
            self._check_rank_saves()

    def _check_rank_saves(self) -> None:
        """--rank at or above every layer's break-even would write an uncompressed copy: refuse it."""
        from lowrank_cli.methods.decompose.allocate import round_rank

        saving = [t for t in self.targets if round_rank(self.opts.rank, self.opts.rank_multiple, min(t.m, t.n))
                  * (t.m + t.n) < t.m * t.n]
        if not saving:
            best = max(int(t.break_even) for t in self.targets)
            raise UsageError(f"--rank {self.opts.rank} saves nothing: every targeted layer's break-even rank is "
                             f"at most {best} (a rank-r pair holds r (m + n) parameters); choose a smaller rank")

    def _memory(self) -> dict:
        import torch

        from lowrank_cli.engine.precision import steering_dtype
        from lowrank_cli.methods.decompose.plan import estimate_output_bytes, estimate_peak_bytes

        opts, cfg = self.opts, self.streamed.model.config
        compute = torch.finfo(self.dtype).bits // 8
        steer = steering_dtype(opts.sensitivity_dtype, opts.device, self.dtype) if self.fisher else None
        memory = estimate_peak_bytes(
            self.ckpt, self.streamed.blocks_name, self.streamed.num_blocks, self.targets, hidden=cfg.hidden_size,
            vocab=cfg.vocab_size, compute_bytes=compute, calib_tokens=opts.calib_samples * opts.calib_seq_len,
            eval_tokens=opts.eval_tokens + opts.test_tokens, seq_len=opts.calib_seq_len,
            batch_size=opts.batch_size, fisher=self.fisher,
            candidates=opts.search_width if self.kind == "target_ppl_increase" else 1,
            own_calib=self._sequential([opts.params_ratio]) and opts.method != "svd",
            head_copy_bytes=torch.finfo(steer).bits // 8 if steer not in (None, self.dtype) else 0,
            kept_grams=self.gram_store_bound() if self._keeps_grams() else 0)
        memory["device"] = opts.device
        memory["compute_dtype"] = str(self.dtype).replace("torch.", "")
        memory["output"] = estimate_output_bytes(self.ckpt, self.targets, keep=opts.params_ratio, rank=opts.rank,
                                                 multiple=opts.rank_multiple)
        return memory

    def _base(self) -> dict:
        from lowrank_cli.methods.decompose.plan import plan_summary

        return dict(model=self.model, method=self.opts.method, allocation=self.opts.allocation, budget=self.budget,
                    plan=plan_summary(self.targets), memory=self._memory())

    def plan_only(self) -> DecomposeResult:
        params = {"model_before": self.ckpt.num_params(), "targeted_before": self.targeted_before,
                  "targeted_layers": len(self.targets)}
        return DecomposeResult(output=None, dry_run=True, perplexity={}, ranks={}, dense_layers=[], evaluations=[],
                               params=params, timings_s=self.timer.seconds, **self._base())

    # -- the run ---------------------------------------------------------------------------------------------
    def _task(self, label: str):
        task = self.progress.task(label, self.streamed.num_blocks)
        return task, (lambda *_: task.advance())

    def run(self) -> DecomposeResult:
        import logging

        import torch


        with self.timer("data"):
            self.windows = solver_windows(load_tokenizer(self.path), self.opts)
        w = self.windows
        logging.getLogger("lowrank").info("calibration %d x %d, eval %d x %d, test %d x %d tokens",
                                          *w.calib.shape, *w.eval.shape, *w.test.shape)
        torch.manual_seed(self.opts.seed)
        self.curves, self.baseline, sens = self._profile()
        out = OutputDir(self.opts.output, overwrite=self.opts.overwrite, inputs=[self.path])
        with out as tmp:
            chosen = self._choose(tmp)
            result = self._write(tmp, chosen, sens)
            result.output = str(out.target)
            out.commit()
        return result

    def _evalsets(self) -> dict:
        return {"eval": self.windows.eval, "test": self.windows.test}

    def _products(self):
        import torch

        return torch.float32 if self.opts.gram_products == "float32" else None

    def _profile(self):
        """Error curves on the original model's Grams, baseline eval/test perplexity, Fisher sensitivities."""
        from lowrank_cli.engine.sequential import Candidate, run_pipeline
        from lowrank_cli.methods.decompose.allocate import LayerCurve

        opts = self.opts
        self.gram_store = self.make_gram_store(self._products()) if self._keeps_grams() else None
        # the curves alone take float32 Gram products (see CURVE_PRODUCTS); Grams kept for the factors take theirs
        profiler = self.profiler(opts.method, curves=opts.allocation != "uniform" and self.kind != "rank",
                                 store=self.gram_store)
        with self.timer("profile"):
            task, tick = self._task("profile")
            outcome = run_pipeline(self.streamed, self.windows.calib, self._evalsets(), self.targets,
                                   [Candidate("profile", profiler)], sequential=False, batch_size=opts.batch_size,
                                   keep_boundaries=self.fisher, progress=tick, gram_store=self.gram_store)
            task.close()
        nll, _, _ = outcome.only()
        sens = self.sensitivities(self.windows.calib, outcome.boundaries) if self.fisher else {}
        curves = [LayerCurve(t.name, t.m, t.n, profiler.tails[t.name], sens.get(t.name, 1.0)) for t in self.targets]
        return curves, {name: v.perplexity for name, v in nll.items()}, sens

    def _sequential(self, kept: list[float | None]) -> bool:
        """Whether a compress pass evaluating these kept fractions (None: not known yet) calibrates
        sequentially: --sequential / --no-sequential, or by SEQUENTIAL_BELOW."""
        if self.opts.sequential is not None:
            return self.opts.sequential
        return any(k is None or k < SEQUENTIAL_BELOW for k in kept)

    def _keeps_grams(self) -> bool:
        """Without sequential calibration every pass measures the same Grams (the original model's): the profile
        keeps them for the compress passes, unless no pass would use them or they do not fit
        (`SolverJob.grams_fit`)."""
        profile_grams = self.opts.allocation != "uniform" and self.kind != "rank"
        one_compress_pass = self.kind != "target_ppl_increase"
        never = self.opts.sequential or (self.kind == "params_ratio" and self._sequential([self.opts.params_ratio]))
        if never or self.opts.method == "svd" or (one_compress_pass and not profile_grams):
            return False
        return self.grams_fit()

    def _ranks(self, keep: float) -> dict:
        from lowrank_cli.methods.decompose import allocate

        if self.opts.allocation == "uniform":
            return allocate.uniform_ranks(self.curves, keep, self.opts.rank_multiple)
        return allocate.allocate_ranks(self.curves, keep, self.opts.rank_multiple)

    def _compress(self, tmp, keep: float | None, ranks: dict) -> dict:
        """One candidate: factorize at `ranks` into a candidate folder; its evaluation record."""
        return self._compress_many(tmp, [(keep, ranks)])[0]

    def _compress_many(self, tmp, runs: list[tuple[float | None, dict]]) -> list[dict]:
        """Every (keep, ranks) candidate in one pipeline pass (each block read once for all), each written
        to its own candidate folder; their evaluation records, in order."""
        from lowrank_cli.engine.sequential import Candidate, run_pipeline
        from lowrank_cli.io.finish import copy_outer_tensors
        from lowrank_cli.io.writer import ShardWriter, parse_size
        from lowrank_cli.methods.decompose.modifier import Factorize

        opts, first = self.opts, len(self.evaluations)
        self.passes += 1
        cands, writers = [], []
        for k, (_, ranks) in enumerate(runs):
            folder = tmp / f".candidate-{first + k}"
            folder.mkdir()
            writers.append((folder, ShardWriter(folder, parse_size(opts.max_shard_size))))
            modifier = Factorize(ranks, opts.method, opts.damp, dense=opts.format == "dense",
                                 product_dtype=self._products())
            cands.append(Candidate(f"candidate-{first + k}", modifier, self._sink(writers[-1][1])))
        keeps = ", ".join(f"{keep:.3f}" for keep, _ in runs if keep is not None)
        sequential = self._sequential([self._kept_fraction(ranks) for _, ranks in runs])
        with self.timer("compress"):
            task, tick = self._task(f"compress {self.passes}" + (f" keep={keeps}" if keeps else ""))
            outcome = run_pipeline(self.streamed, self.windows.calib, self._evalsets(), self.targets, cands,
                                   sequential=sequential, true_sequential=opts.true_sequential,
                                   batch_size=opts.batch_size, progress=tick, gram_store=self.gram_store)
            task.close()
        records = []
        for (keep, ranks), cand, (folder, writer) in zip(runs, cands, writers, strict=True):
            copy_outer_tensors(self.ckpt, self.streamed.blocks_name, cand.sink)
            writer.close()
            records.append(self._record(keep, ranks, folder, outcome.nll[cand.name], outcome.layers[cand.name],
                                        outcome.seconds[cand.name]))
            records[-1]["sequential"] = sequential
        return records

    def _kept_fraction(self, ranks: dict) -> float:
        from lowrank_cli.methods.decompose.allocate import kept_params

        return kept_params(self.curves, ranks) / self.targeted_before

    def _sink(self, writer):
        def sink(name, tensor):
            writer.add(name, tensor.to(_out_dtype(self.ckpt, name) or tensor.dtype))

        return sink

    def _record(self, keep, ranks: dict, folder, nll: dict, layers: list[dict], seconds: float) -> dict:
        """One evaluation, appended to the search's history and logged."""
        import logging

        ppl = nll["eval"].perplexity
        record = {"keep": keep, "kept_fraction": self._kept_fraction(ranks),
                  "perplexity": ppl, "increase": ppl / self.baseline["eval"] - 1,
                  "test_perplexity": nll["test"].perplexity, "factorized_layers": len(layers),
                  "pass": self.passes, "seconds": round(seconds, 2), "folder": folder, "ranks": ranks,
                  "layers": layers, "nll": nll}
        self.evaluations.append(record)
        logging.getLogger("lowrank").info(
            "evaluation %d (pass %d): keep %s -> %.4f of targeted params, eval perplexity %.4f (%+.2f%%)",
            len(self.evaluations), self.passes, "-" if keep is None else f"{keep:.3f}", record["kept_fraction"],
            ppl, record["increase"] * 100)
        return record

    def _choose(self, tmp) -> dict:
        """The candidate to write: the fixed budget's one, or the search's smallest passing one."""
        from lowrank_cli.methods.decompose import allocate

        self.evaluations: list[dict] = []
        self.passes = 0  # streamed compress passes so far
        if self.kind == "rank":
            return self._compress(tmp, None, allocate.fixed_ranks(self.curves, self.opts.rank,
                                                                  self.opts.rank_multiple))
        if self.kind == "params_ratio":
            return self._compress(tmp, self.opts.params_ratio, self._ranks(self.opts.params_ratio))
        return self._search(tmp)

    def _floor(self) -> float:
        """The smallest keep the allocation can reach (rank `rank_multiple` wherever that saves), at least 5%."""
        from lowrank_cli.methods.decompose import allocate

        smallest = allocate.fixed_ranks(self.curves, self.opts.rank_multiple, self.opts.rank_multiple)
        return max(0.05, allocate.kept_params(self.curves, smallest) / self.targeted_before + 1e-3)

    def _search(self, tmp) -> dict:
        import math
        import shutil

        from lowrank_cli.errors import BudgetNotMet
        from lowrank_cli.methods.decompose import search

        limit = self.baseline["eval"] * (1 + self.budget["value"])
        best: dict = {}

        def keep_smallest_passing(record) -> None:
            if record["passed"] and (not best or record["kept_fraction"] < best["kept_fraction"]):
                if best:
                    shutil.rmtree(best["folder"])  # only the smallest passing model stays on disk
                best.clear()
                best.update(record)
            else:
                shutil.rmtree(record["folder"])

        def evaluate_many(keeps):
            found = []
            for record in self._compress_many(tmp, [(k, self._ranks(k)) for k in keeps]):
                passed = math.isfinite(record["perplexity"]) and record["perplexity"] <= limit
                record["passed"] = passed and record["factorized_layers"] > 0
                keep_smallest_passing(record)
                found.append(search.Candidate(record["keep"], record["kept_fraction"], record["perplexity"],
                                              passed, record["factorized_layers"], increase=record["increase"]))
            return found

        floor = self._floor()
        if floor >= 1:
            raise UsageError(f"no targeted layer saves parameters at rank {self.opts.rank_multiple} (every "
                             "break-even rank is lower), so no kept fraction below 1 exists: lower "
                             "--rank-multiple or change --targets")
        found = search.search_keep_batched(evaluate_many, width=self.opts.search_width,
                                           rounds=self.opts.search_steps, floor=floor, **self._guess(floor))
        if found.best is None:
            closest = found.closest
            raise BudgetNotMet(
                f"no compressed model met +{self.budget['value'] * 100:.3g}% eval perplexity (limit {limit:.4f}); "
                f"closest: {closest.perplexity:.4f} keeping {closest.kept_fraction:.3f} of the targeted "
                f"parameters after {len(found.tried)} evaluations in {found.rounds} passes; nothing was written",
                hint="raise the budget, add calibration text, or narrow --targets",
                details={"evaluations": [_public(r) for r in self.evaluations], "baseline": self.baseline["eval"]})
        return best

    def _guess(self, floor: float) -> dict:
        """Where the search starts (the Fisher estimate's prediction of the increase when there is one), and
        the budget its measured increases are interpolated to."""
        from lowrank_cli.methods.decompose import search

        if not self.fisher:
            return {"first": 0.8, "budget": self.budget["value"]}
        tokens = int(self.windows.calib.numel())

        def predict(keep):
            return _predicted_increase(self.curves, self._ranks(keep), tokens)

        first = search.first_guess(predict, self.budget["value"], lo=max(0.3, floor))
        return {"first": first, "predict": predict, "budget": self.budget["value"]}

    def _write(self, tmp, chosen: dict, sens: dict) -> DecomposeResult:
        """Move the chosen candidate's shards into place, then config, side files, manifest."""
        import shutil

        from lowrank_cli.io.finish import finish_folder
        from lowrank_cli.modeling import export
        from lowrank_cli.utils.memory import peak_rss_bytes

        for item in chosen["folder"].iterdir():
            shutil.move(str(item), tmp / item.name)
        for other in tmp.glob(".candidate-*"):
            shutil.rmtree(other)
        factored = {r["name"]: r["rank"] for r in chosen["layers"]}
        config = dict(self.ckpt.config)
        if self.opts.format == "factorized" and factored:
            config = export.lowrank_config(config, factored, self.opts.method)
            export.write_modeling_file(tmp, self.ckpt.model_type)
        params = self._params(chosen["layers"])
        nll, base = chosen["nll"], self.baseline
        perplexity = {"baseline": base["eval"], "final": nll["eval"].perplexity,
                      "increase": nll["eval"].perplexity / base["eval"] - 1,
                      "test_baseline": base["test"], "test_final": nll["test"].perplexity,
                      "test_increase": nll["test"].perplexity / base["test"] - 1,
                      "eval_tokens": nll["eval"].tokens, "test_tokens": nll["test"].tokens,
                      "calib_tokens": int(self.windows.calib.numel())}
        base_fields = self._base()
        base_fields["memory"]["peak_resident_param_bytes"] = self.streamed.peak_resident_bytes
        base_fields["memory"]["peak_rss_bytes"] = peak_rss_bytes()
        evaluations = [_public(r) for r in self.evaluations]
        result = DecomposeResult(output=None, dry_run=False, params=params, perplexity=perplexity, ranks=factored,
                                 dense_layers=[t.name for t in self.targets if t.name not in factored],
                                 evaluations=evaluations, timings_s=self.timer.seconds, precision=self.precision,
                                 **base_fields)
        finish_folder(tmp, self.ckpt, config, command="decompose", options=vars(self.opts),
                      input_info={"model": self.model, "path": str(self.path),
                                  "fingerprint": self.ckpt.fingerprint()},
                      metrics={"params": params, "perplexity": perplexity, "evaluations": evaluations},
                      extra={"layers": chosen["layers"], "sensitivity": sens, "timings_s": self.timer.seconds,
                             "precision": self.precision})
        return result

    def _params(self, layers: list[dict]) -> dict:
        model_before = self.ckpt.num_params()
        factored = {r["name"] for r in layers}
        targeted_after = sum(r["params_after"] for r in layers) + sum(
            t.params for t in self.targets if t.name not in factored)
        model_after = model_before - self.targeted_before + targeted_after
        return {"model_before": model_before, "model_after": model_after, "model_ratio": model_after / model_before,
                "targeted_before": self.targeted_before, "targeted_after": targeted_after,
                "targeted_ratio": targeted_after / self.targeted_before, "targeted_layers": len(self.targets),
                "factorized_layers": len(factored)}


def _public(record: dict) -> dict:
    """An evaluation record as reported (no folders, tensors or rank maps)."""
    return {k: v for k, v in record.items() if k not in ("folder", "ranks", "layers", "nll")}
