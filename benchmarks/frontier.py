"""The size/quality frontier `lowrank compress` searches (issue: compress): bytes against test perplexity on
code and on English prose, for every candidate family, and which candidate compress picks per budget.

One compress run (library API) with every family switched on, so all candidates share one calibration pass
and one streamed pass over the model, exactly as `lowrank compress` builds them:

    gptq              GPTQ alone at --bits (default 8, 4, 3, 2; asymmetric, act-order, groups of 128)
    factorize-gptq    factorization keeping --keeps of the targeted parameters (Fisher allocation by default,
                      ranks in multiples of 32), then GPTQ of both factors at 4 and 3 bits
    gptq-lr           GPTQ + a rank-32 correction of its error (CALDERA/LQER), a PEFT adapter, at 3 and 2 bits
    factorize         factorization alone, 16-bit
With --heal-steps N the chosen candidate and up to two smaller near misses are healed (LoRA, N steps of
batch 4, merged back; GPTQ ones requantized) and measured again.

Text (three disjoint parts of the stdlib, see lowrank_cli/data/sources.py): calibration = the command's
default; eval = held-out stdlib code (what a budget is checked on); test = the other half of the held-out
code, plus the held-out half of the stdlib's English documentation (prose), reported only.

    python benchmarks/frontier.py --model demo
    python benchmarks/frontier.py --model smollm2 --eval-tokens 2048 --test-tokens 2048 --heal-steps 20

Prints a table; writes benchmarks/results/frontier-<model>.json and frontier-<model>.png.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from smollm2 import model_path  # noqa: E402  (beside this script)

BUDGETS = (0.01, 0.02, 0.05, 0.10, 0.20)


def run(args) -> dict:
    from lowrank_cli.api.common import load_tokenizer, solver_windows, text_windows
    from lowrank_cli.api.compress_job import CompressJob
    from lowrank_cli.api.options.compress import CompressOptions
    from lowrank_cli.io.checkpoint import Checkpoint
    from lowrank_cli.io.resolve import resolve_model
    from lowrank_cli.utils.progress import Progress

    path = resolve_model(model_path(args.model))
    out = Path(tempfile.mkdtemp(prefix="frontier-")) / "winner"
    opts = CompressOptions(output=str(out), target_ppl_increase=args.budget, families=args.families,
                           bits=args.bits, keeps=args.keeps, heal_steps=args.heal_steps,
                           calib_samples=args.calib_samples, eval_tokens=args.eval_tokens,
                           test_tokens=args.test_tokens, calib=args.calib, allocation=args.allocation,
                           sequential=args.sequential, prune=False)  # the whole map, every candidate measured
    opts.validate()
    job = CompressJob(args.model, path, Checkpoint(path), opts, Progress())
    # The frontier is mapped whole and budgets are applied to it afterwards (the table's 1-20% rows), so the
    # run's own post-pass noise refusal is not wanted here; the recorded paired noise shows which rows hold.
    job._check_resolution = lambda records: None
    choose = job._choose

    def choose_or_closest(records):  # a frontier is mapped even when no candidate meets the run's budget
        from lowrank_cli.errors import BudgetNotMet

        try:
            return choose(records)
        except BudgetNotMet:
            return min(records, key=lambda r: r["eval_perplexity"])

    job._choose = choose_or_closest
    tokenizer = load_tokenizer(path)
    job.extra_tests = {"prose": text_windows(tokenizer, "stdlib-prose", part="test", seq_len=opts.calib_seq_len,
                                             max_tokens=args.test_tokens, seed=opts.seed)}
    start = time.perf_counter()
    result = job.run()
    seconds = time.perf_counter() - start
    frontier = json.loads((out / "frontier.json").read_text())
    windows = solver_windows(tokenizer, opts)
    return {"model": args.model, "settings": vars(args), "seconds": round(seconds, 1),
            "timings_s": result.timings_s, "baseline": frontier["baseline"], "candidates": frontier["candidates"],
            "chosen_at": _choices(frontier), "tokens": {"calib": int(windows.calib.numel()),
                                                        "eval": int(windows.eval.numel()),
                                                        "test": int(windows.test.numel())}}


def _choices(frontier: dict) -> dict:
    """Per budget: what compress picks (smallest bytes within it, on eval), and the smallest GPTQ-alone
    candidate within it, for comparison."""
    base = frontier["baseline"]["eval"]
    out = {}
    for budget in BUDGETS:
        ok = [r for r in frontier["candidates"] if r["eval_perplexity"] <= base * (1 + budget)]
        pick = min(ok, key=lambda r: (r["bytes"], r["eval_perplexity"]), default=None)
        gptq = min((r for r in ok if r["family"] == "gptq" and not r["healed"]), key=lambda r: r["bytes"],
                   default=None)
        out[f"{budget:g}"] = {"chosen": pick and pick["label"], "chosen_bytes": pick and pick["bytes"],
                              "gptq_alone": gptq and gptq["label"], "gptq_alone_bytes": gptq and gptq["bytes"]}
    return out


def dominated_gptq(rows: list[dict]) -> list[tuple[str, str]]:
    """(combined candidate, GPTQ-alone candidate) pairs where the combined one has no more bytes and lower
    test perplexity on code and on prose."""
    gptq = [r for r in rows if r["family"] == "gptq" and not r["healed"]]
    pairs = []
    for r in rows:
        if r["family"] == "gptq" and not r["healed"]:
            continue
        for g in gptq:
            if r["bytes"] <= g["bytes"] and r["test_perplexity"] < g["test_perplexity"] \
                    and r["prose_perplexity"] < g["prose_perplexity"]:
                pairs.append((r["label"], g["label"]))
    return pairs


def table(doc: dict) -> str:
    b = doc["baseline"]
    lines = [f"{doc['model']}: input {b['bytes'] / 2**20:.1f} MiB, eval {b['eval']:.3f}, test code {b['test']:.3f}, "
             f"test prose {b['prose_perplexity']:.3f}  ({doc['seconds']:.0f} s)",
             f"{'candidate':34s} {'MiB':>7s} {'bits/w':>6s} {'eval':>8s} {'+%':>6s} {'code':>8s} {'prose':>8s}"]
    for r in sorted(doc["candidates"], key=lambda r: r["bytes"]):
        lines.append(f"{r['label']:34s} {r['bytes'] / 2**20:7.2f} {r['bits_per_weight']:6.2f} "
                     f"{r['eval_perplexity']:8.3f} {r['eval_increase'] * 100:6.2f} {r['test_perplexity']:8.3f} "
                     f"{r['prose_perplexity']:8.3f}")
    lines.append("budget: compress picks (MiB) | smallest GPTQ alone within it (MiB)")
    for budget, c in doc["chosen_at"].items():
        pick = f"{c['chosen']} ({c['chosen_bytes'] / 2**20:.2f})" if c["chosen"] else "-"
        gptq = f"{c['gptq_alone']} ({c['gptq_alone_bytes'] / 2**20:.2f})" if c["gptq_alone"] else "-"
        lines.append(f"  +{float(budget) * 100:g}%: {pick} | {gptq}")
    pairs = dominated_gptq(doc["candidates"])
    lines.append("combined candidates that dominate GPTQ alone (bytes, code and prose): "
                 + (", ".join(f"{a} over {b}" for a, b in pairs) or "none"))
    return "\n".join(lines)


def plot(doc: dict, path: Path) -> None:
    from lowrank_cli.utils.frontier_plot import write_frontier_png

    for suffix, key in (("", "test_perplexity"), ("-prose", "prose_perplexity")):
        points = [{**r, "family": r["family"] + (" + heal" if r["healed"] else ""), "test_ppl": r[key]}
                  for r in doc["candidates"]]
        base = doc["baseline"]["test" if key == "test_perplexity" else "prose_perplexity"]
        write_frontier_png(path.with_name(path.stem + suffix + ".png"), points, base_ppl=base,
                           title=f"{doc['model']}: bytes vs test perplexity ({'code' if not suffix else 'prose'})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="demo")
    parser.add_argument("--families", nargs="+", default=["gptq", "factorize-gptq", "gptq-lr", "factorize"])
    parser.add_argument("--bits", nargs="+", type=int, default=[8, 4, 3, 2])
    parser.add_argument("--keeps", nargs="+", type=float, default=[0.9, 0.8, 0.7])
    parser.add_argument("--heal-steps", type=int, default=0)
    parser.add_argument("--budget", type=float, default=0.2, help="the run's own budget (which candidate it "
                        "writes and heals); the table shows the pick at other budgets too")
    parser.add_argument("--calib", default=None)
    parser.add_argument("--calib-samples", type=int, default=16)
    parser.add_argument("--eval-tokens", type=int, default=4096)
    parser.add_argument("--test-tokens", type=int, default=4096)
    parser.add_argument("--allocation", default="fisher", choices=["fisher", "error", "uniform"])
    parser.add_argument("--sequential", action="store_true", help="each candidate calibrated on its own upstream")
    parser.add_argument("--tag", default="", help="suffix of the output file names")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    doc = run(args)
    out = HERE / "results" / f"frontier-{args.model}{args.tag}.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(doc, indent=2, default=str) + "\n")
    plot(doc, out.with_suffix(".png"))
    print(table(doc))
    print(f"wrote {out} and {out.with_suffix('.png').name}")


if __name__ == "__main__":
    main()
