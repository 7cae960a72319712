"""`lowrank compress MODEL`."""

from __future__ import annotations

from typing import Annotated

import typer

from lowrank_cli.cli import options as opt
from lowrank_cli.cli.decompose import parse_fraction
from lowrank_cli.cli.runner import run

EPILOG = """\
[bold]Examples[/bold]

  # the smallest checkpoint whose eval perplexity stays within 5% of the input's
  lowrank compress demo --target-ppl-increase 5% -o out/demo-small
  # the best quality within 40% of the input's weight bytes (or --target-size 60MB)
  lowrank compress demo --target-size 40% -o out/demo-40
  # see the candidates, their exact sizes and the cost, without running them
  lowrank compress demo --target-ppl-increase 1% --dry-run
  # only GPTQ and factorize-then-GPTQ, at 3 and 4 bits
  lowrank compress demo --families gptq,factorize-gptq --bits 3,4 -o out/demo-fq

[bold]Families[/bold]: gptq (GPTQ alone), factorize-gptq (factorization keeping --keeps of the
targeted parameters, then GPTQ of both factors), gptq-lr (GPTQ + a rank --correction-rank correction
of its error, stored as a PEFT LoRA adapter in correction/), factorize (factorization alone, 16-bit).
The choice reads eval perplexity and bytes only; test perplexity (disjoint text) is what is reported.
Writes the winner plus frontier.json and frontier.png. Exit code 3 when no candidate meets the target.
"""

TARGET, SEARCH, DATA = "Target", "Search", "Data"


def _list(text: str | None, cast, flag: str):
    from lowrank_cli.errors import UsageError

    if text is None:
        return None
    try:
        return [cast(p.strip()) for p in text.split(",") if p.strip()]
    except ValueError:
        raise UsageError(f"{flag} takes a comma-separated list, got '{text}'") from None


def compress_command(
    model: opt.MODEL,
    output: Annotated[str | None, typer.Option("--output", "-o", help="Output folder (must not exist or be "
                                               "empty).", rich_help_panel="Output", show_default=False)] = None,
    target_ppl_increase: Annotated[str | None, typer.Option(
        "--target-ppl-increase", help="Largest allowed eval perplexity increase, e.g. 1% or 0.01 (default 1%): "
        "the smallest candidate within it wins.", rich_help_panel=TARGET, show_default=False)] = None,
    target_size: Annotated[str | None, typer.Option(
        "--target-size", help="Largest weight size: bytes (60MB, 1.5GB) or a fraction of the input's (0.3, 30%): "
        "the best eval perplexity within it wins.", rich_help_panel=TARGET, show_default=False)] = None,
    families: Annotated[str | None, typer.Option(
        "--families", help="Comma-separated: gptq, factorize-gptq, gptq-lr, factorize. Default: the first three.",
        rich_help_panel=SEARCH, show_default=False)] = None,
    bits: Annotated[str | None, typer.Option("--bits", help="GPTQ bit widths tried (default 8,4,3,2).",
                                             rich_help_panel=SEARCH, show_default=False)] = None,
    keeps: Annotated[str | None, typer.Option("--keeps", help="Kept fractions of the targeted parameters tried "
                                              "by the factorizing families (default 0.9,0.8).",
                                              rich_help_panel=SEARCH, show_default=False)] = None,
    correction_rank: Annotated[int, typer.Option("--correction-rank", help="Rank of gptq-lr's correction.",
                                                 rich_help_panel=SEARCH)] = 32,
    group_size: Annotated[int, typer.Option("--group-size", help="GPTQ group size (-1: per channel).",
                                            rich_help_panel=SEARCH)] = 128,
    sym: Annotated[bool, typer.Option("--sym/--no-sym", help="Symmetric GPTQ grid.", rich_help_panel=SEARCH)] = False,
    act_order: Annotated[bool, typer.Option("--act-order/--no-act-order", help="GPTQ activation order.",
                                            rich_help_panel=SEARCH)] = True,
    damp: Annotated[float, typer.Option("--damp", help="Gram damping, a fraction of its mean diagonal.",
                                        rich_help_panel=SEARCH)] = 0.01,
    allocation: Annotated[str, typer.Option("--allocation", help="Ranks of the factorizing families: error "
                                            "(output error curves) or uniform.", rich_help_panel=SEARCH)] = "error",
    sequential: Annotated[bool, typer.Option(
        "--sequential/--no-sequential", help="Calibrate each candidate on its own compressed upstream (one "
        "calibration stream per candidate: slower). Default: every candidate from the input's Grams.",
        rich_help_panel=SEARCH)] = False,
    heal_steps: Annotated[int, typer.Option("--heal-steps", help="LoRA healing steps on the chosen candidate "
                                            "(0: none); measured like every candidate.", rich_help_panel=SEARCH)] = 0,
    calib: Annotated[str | None, typer.Option("--calib", help="Calibration text. Default: a stdlib part disjoint "
                                              "from the eval and test text.", rich_help_panel=DATA,
                                              show_default=False)] = None,
    calib_samples: Annotated[int, typer.Option("--calib-samples", help="Calibration windows.",
                                               rich_help_panel=DATA)] = 16,
    seq_len: Annotated[int, typer.Option("--seq-len", help="Tokens per window.", rich_help_panel=DATA)] = 512,
    data: Annotated[str | None, typer.Option("--data", "--eval-data", help="Eval text (what the choice reads).",
                                             rich_help_panel=DATA, show_default=False)] = None,
    eval_tokens: Annotated[int, typer.Option("--eval-tokens", help="Eval tokens.", rich_help_panel=DATA)] = 4096,
    test_data: Annotated[str | None, typer.Option("--test-data", help="Test text (what is reported).",
                                                  rich_help_panel=DATA, show_default=False)] = None,
    test_tokens: Annotated[int, typer.Option("--test-tokens", help="Test tokens.", rich_help_panel=DATA)] = 4096,
    text_field: opt.TEXT_FIELD = "text",
    max_shard_size: Annotated[str, typer.Option("--max-shard-size", help="Largest safetensors shard.",
                                                rich_help_panel="Output")] = "2GB",
    overwrite: opt.OVERWRITE = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the candidates, their exact sizes and the "
                                          "cost estimate; run and write nothing.", rich_help_panel="Output")] = False,
    device: opt.DEVICE = "cpu",
    dtype: opt.DTYPE = "auto",
    batch_size: opt.BATCH_SIZE = 1,
    offload_dir: Annotated[str | None, typer.Option("--offload-dir", help="Keep activations on disk here.",
                                                    rich_help_panel="Runtime", show_default=False)] = None,
    seed: opt.SEED = 0,
    json_out: opt.JSON = False,
) -> None:
    """The smallest checkpoint within a quality budget, across quantization and factorization.

    Builds every candidate (GPTQ at several bit widths, factorization then GPTQ, GPTQ with a low-rank
    correction, factorization alone) in one streamed pass from one calibration pass, measures each on
    eval and test text, and keeps the smallest whose eval perplexity meets the target.
    """

    def job(progress):
        from lowrank_cli.api.compress import CompressOptions, compress

        opts = CompressOptions(
            output=output, target_ppl_increase=parse_fraction(target_ppl_increase, "--target-ppl-increase"),
            target_size=target_size, families=_list(families, str, "--families"), bits=_list(bits, int, "--bits"),
            keeps=_list(keeps, float, "--keeps"), correction_rank=correction_rank, group_size=group_size, sym=sym,
            act_order=act_order, damp=damp, allocation=allocation, heal_steps=heal_steps, calib=calib,
            calib_samples=calib_samples, calib_seq_len=seq_len, eval_data=data, eval_tokens=eval_tokens,
            test_data=test_data, test_tokens=test_tokens, text_field=text_field, sequential=sequential,
            max_shard_size=max_shard_size, device=device, dtype=dtype, batch_size=batch_size,
            offload_dir=offload_dir, overwrite=overwrite, dry_run=dry_run, seed=seed)
        return compress(model, opts, progress)

    run("compress", job, json_mode=json_out)
