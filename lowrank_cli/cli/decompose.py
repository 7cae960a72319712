"""`lowrank decompose MODEL`."""

from __future__ import annotations

from typing import Annotated

import typer

from lowrank_cli.cli import options as opt
from lowrank_cli.cli.runner import run
from lowrank_cli.errors import UsageError

EPILOG = """\
[bold]Examples[/bold]

  # smallest model within 1% of the original perplexity
  lowrank decompose bigcode/starcoder --target-ppl-increase 1% \\
      -o out/starcoder-lord --device cuda
  # keep 80% of the targeted layers' parameters; MLP layers only
  lowrank decompose demo --params-ratio 0.8 --targets 'mlp.*' -o out/demo-80
  # see the plan (targets, break-even ranks, memory) without writing
  lowrank decompose demo --rank 64 --dry-run
  # a standard checkpoint (products multiplied back) for tools without remote code
  lowrank decompose demo --params-ratio 0.8 --format dense -o out/demo-dense

[bold]Budgets[/bold] (one of): --target-ppl-increase (default 1%), --params-ratio, --rank.
"Params ratio" is the fraction of the targeted layers' parameters kept; model-level counts
(embeddings included) are reported too. Exit code 3 when no compressed model meets the budget.
"""

BUDGET, METHOD, DATA = "Budget", "Method", "Data"


def parse_fraction(text: str | None, flag: str) -> float | None:
    """'1%' -> 0.01; '0.01' -> 0.01 (a bare number is a fraction)."""
    if text is None:
        return None
    raw = text.strip()
    try:
        value = float(raw[:-1]) / 100 if raw.endswith("%") else float(raw)
    except ValueError:
        raise UsageError(f"{flag} takes a percentage like 1% or a fraction like 0.01, got '{text}'") from None
    return value


def decompose_command(
    model: opt.MODEL,
    output: Annotated[str | None, typer.Option("--output", "-o", help="Output folder (must not exist or be "
                                               "empty).", rich_help_panel="Output", show_default=False)] = None,
    target_ppl_increase: Annotated[str | None, typer.Option(
        "--target-ppl-increase", help="Largest allowed perplexity increase on held-out text, e.g. 1% or "
        "0.01. Searches for the smallest model that meets it.", rich_help_panel=BUDGET,
        show_default=False)] = None,
    params_ratio: Annotated[float | None, typer.Option(
        "--params-ratio", help="Fraction of the targeted layers' parameters to keep, in (0, 1].",
        rich_help_panel=BUDGET, show_default=False)] = None,
    rank: Annotated[int | None, typer.Option("--rank", help="One rank for every targeted layer.",
                                             rich_help_panel=BUDGET, show_default=False)] = None,
    method: Annotated[str, typer.Option("--method", help="lord: factors minimizing the output error "
                                        "||(W - W')X|| on calibration text; svd: weights only.",
                                        rich_help_panel=METHOD)] = "lord",
    targets: Annotated[str | None, typer.Option(
        "--targets", help="Comma-separated module-name patterns (globs; a bare name like c_fc matches it in "
        "every block). Default: every linear layer inside the decoder blocks.", rich_help_panel=METHOD,
        show_default=False)] = None,
    allocation: Annotated[str, typer.Option(
        "--allocation", help="fisher: ranks where the loss cares least (one streamed backward pass); "
        "error: by output error alone; uniform: the same fraction in every layer.",
        rich_help_panel=METHOD)] = "fisher",
    rank_multiple: Annotated[int, typer.Option("--rank-multiple", help="Round ranks to a multiple of this.",
                                               rich_help_panel=METHOD)] = 8,
    sequential: Annotated[bool, typer.Option(
        "--sequential/--no-sequential", help="Calibrate each layer on the outputs of the already "
        "compressed layers before it.", rich_help_panel=METHOD)] = True,
    damp: Annotated[float, typer.Option("--damp", help="Gram damping, a fraction of its mean diagonal.",
                                        rich_help_panel=METHOD)] = 0.01,
    search_steps: Annotated[int, typer.Option("--search-steps", help="Full evaluations the perplexity "
                                              "search may spend.", rich_help_panel=BUDGET)] = 6,
    calib: Annotated[str | None, typer.Option(
        "--calib", help="Calibration text (same forms as --data). Default: a stdlib part disjoint from "
        "the evaluation text.", rich_help_panel=DATA, show_default=False)] = None,
    calib_samples: Annotated[int, typer.Option("--calib-samples", help="Calibration windows.",
                                               rich_help_panel=DATA)] = 16,
    seq_len: Annotated[int, typer.Option("--seq-len", help="Tokens per calibration and evaluation window.",
                                         rich_help_panel=DATA)] = 512,
    data: Annotated[str | None, typer.Option(
        "--data", "--eval-data", help="Evaluation text for the budget. Default: held-out stdlib code. If "
        "it is the same source as --calib, documents are split so the two never overlap.",
        rich_help_panel=DATA, show_default=False)] = None,
    eval_tokens: Annotated[int, typer.Option("--eval-tokens", help="Evaluation tokens.",
                                             rich_help_panel=DATA)] = 4096,
    text_field: opt.TEXT_FIELD = "text",
    fmt: Annotated[str, typer.Option("--format", help="factorized: two matrices per layer, loads with "
                                     "trust_remote_code=True; dense: products multiplied back, a standard "
                                     "checkpoint.", rich_help_panel="Output")] = "factorized",
    max_shard_size: Annotated[str, typer.Option("--max-shard-size", help="Largest safetensors shard.",
                                                rich_help_panel="Output")] = "2GB",
    overwrite: opt.OVERWRITE = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Read config and headers only; print the plan "
                                          "and estimates; write nothing.", rich_help_panel="Output")] = False,
    device: opt.DEVICE = "cpu",
    dtype: opt.DTYPE = "auto",
    batch_size: opt.BATCH_SIZE = 1,
    offload_dir: Annotated[str | None, typer.Option(
        "--offload-dir", help="Keep calibration activations on disk here (long calibration sets).",
        rich_help_panel="Runtime", show_default=False)] = None,
    seed: opt.SEED = 0,
    json_out: opt.JSON = False,
) -> None:
    """Compress a checkpoint's linear layers into low-rank factor pairs (LoRD).

    Each targeted layer W becomes up @ down at the rank that minimizes the error of its outputs on
    calibration text; ranks are spread across layers where the loss cares least. The model streams
    from disk one decoder block at a time, so memory tracks one block, not the model.
    """

    def job(progress):
        from lowrank_cli.api.decompose import DecomposeOptions, decompose

        opts = DecomposeOptions(
            output=output, method=method,
            target_ppl_increase=parse_fraction(target_ppl_increase, "--target-ppl-increase"),
            params_ratio=params_ratio, rank=rank, targets=_patterns(targets), allocation=allocation,
            rank_multiple=rank_multiple, calib=calib, calib_samples=calib_samples, calib_seq_len=seq_len,
            eval_data=data, eval_tokens=eval_tokens, text_field=text_field, sequential=sequential,
            damp=damp, search_steps=search_steps, format=fmt, max_shard_size=max_shard_size,
            device=device, dtype=dtype, batch_size=batch_size, offload_dir=offload_dir,
            overwrite=overwrite, dry_run=dry_run, seed=seed)
        return decompose(model, opts, progress)

    run("decompose", job, json_mode=json_out)


def _patterns(text):
    from lowrank_cli.methods.decompose.targets import parse_patterns

    return parse_patterns(text)
