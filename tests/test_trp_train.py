"""`lowrank trp-train`: the factorized checkpoint it writes, the CLI end to end, resume, refused inputs."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from typer.testing import CliRunner

from lowrank_cli.cli.app import app

runner = CliRunner()
IDS = torch.tensor([[1, 5, 9, 33, 70, 2, 400, 17, 8, 255, 3, 11]])
SMALL = ["--max-steps", "4", "--period", "2", "--batch-size", "2", "--max-seq-len", "32", "--eval-tokens", "96",
         "--max-eval-examples", "4", "--energy", "0.8", "--final-energy", "0.5"]


def cli(*args):
    result = runner.invoke(app, [str(a) for a in args])
    return result.exit_code, result


@pytest.mark.parametrize("kind", ["llama", "gpt_bigcode"])
def test_written_checkpoint_reloads_with_equal_logits(kind, tiny_llama, tiny_bigcode, tmp_path):
    from transformers import AutoModelForCausalLM

    from lowrank_cli.api.trp_flow import write_factorized
    from lowrank_cli.io.checkpoint import Checkpoint
    from lowrank_cli.io.verify import verify_checkpoint
    from lowrank_cli.methods.trp.factorize import replace_linears
    from lowrank_cli.modeling.export import load_model

    base = tiny_llama if kind == "llama" else tiny_bigcode
    net = load_model(base, dtype=torch.float32)
    targets = [n for n, m in net.named_modules() if isinstance(m, torch.nn.Linear) and ".0." in n]
    chosen = replace_linears(net, targets, 0.5)
    ranks = {r.name: r.rank for r in chosen if r.factorized}
    assert ranks and len(ranks) == len(targets)
    write_factorized(tmp_path, net, Checkpoint(base), ranks, "30KB")
    for side in Checkpoint(base).side_files():
        shutil.copy2(side, tmp_path / side.name)
    verify_checkpoint(tmp_path)
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 1  # sharded through the index
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, trust_remote_code=True).eval()
    assert reloaded.config.lowrank["ranks"] == ranks and reloaded.config.lowrank["method"] == "trp"
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=IDS).logits, net(input_ids=IDS).logits, rtol=1e-5,
                                   atol=1e-5)


@pytest.mark.slow
def test_trp_train_cli_end_to_end(tiny_llama, tmp_path):
    from transformers import AutoModelForCausalLM

    from lowrank_cli.api.evaluate import evaluate

    out = tmp_path / "out"
    code, res = cli("trp-train", tiny_llama, "-o", out, *SMALL, "--json")
    assert code == 0, res.output
    doc = json.loads(res.stdout)
    assert doc["status"] == "ok" and doc["training"]["steps"] == 4
    ranks = json.loads((out / "config.json").read_text())["lowrank"]["ranks"]
    assert ranks == doc["ranks"] and doc["params"]["targeted_after"] < doc["params"]["targeted_before"]
    rows = [json.loads(line) for line in (out / "trp_ranks.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 2] and doc["rank_history"]["trp_steps"] == 2
    assert set(rows[0]["ranks"]) == {n for n in rows[0]["ranks"] if n.startswith("model.layers.")}
    assert len(rows[0]["ranks"]) == 14
    for name in ("trp_ranks.png", "loss_curve.jsonl", "lowrank.json", "tokenizer.json", "modeling_lowrank.py"):
        assert (out / name).is_file(), name
    assert doc["overhead"]["trp_seconds"] > 0 and doc["overhead"]["mean_trp_step_s"] is not None
    # the reported final perplexity is the one `lowrank eval` measures on the output
    again = evaluate(str(out), seq_len=32, max_tokens=96)
    assert again.perplexity == pytest.approx(doc["perplexity"]["final"], rel=1e-5)
    AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)
    assert not (tmp_path / ".out.checkpoints").exists()


@pytest.mark.slow
def test_resume_is_exact(tiny_llama, tmp_path):
    from safetensors.torch import load_file

    ckpts = tmp_path / "ckpts"
    args = [*SMALL, "--save-every", "2", "--checkpoint-dir", ckpts, "--json"]
    code, res = cli("trp-train", tiny_llama, "-o", tmp_path / "a", *args)
    assert code == 0, res.output
    assert (ckpts / "step-000002").is_dir()
    code, res = cli("trp-train", tiny_llama, "-o", tmp_path / "b", *args, "--resume")
    assert code == 0, res.output
    assert json.loads(res.stdout)["training"]["resumed_from_step"] == 2
    a, b = load_file(tmp_path / "a" / "model.safetensors"), load_file(tmp_path / "b" / "model.safetensors")
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name

    def ranks(folder):  # the rank history, without its wall times
        return [(r["step"], r["ranks"]) for r in map(json.loads, (folder / "trp_ranks.jsonl").read_text().splitlines())]

    assert ranks(tmp_path / "a") == ranks(tmp_path / "b") and len(ranks(tmp_path / "a")) == 2


@pytest.mark.parametrize("args,match", [
    (["--energy", "0"], "--energy must be in (0, 1]"),
    (["--energy", "1.5"], "--energy must be in (0, 1]"),
    (["--final-energy", "-0.1"], "--final-energy must be in (0, 1]"),
    (["--period", "0"], "--period must be at least 1"),
    (["--optimizer", "adam"], "unknown --optimizer 'adam'"),
    (["--final-rule", "rank"], "unknown --final-rule 'rank'"),
    (["--final-threshold", "-1"], "--final-threshold must be >= 0"),
    (["--targets", "no_such_layer"], "matches no linear layer"),
])
def test_refused_inputs(args, match, tiny_llama, tmp_path):
    out = tmp_path / "out"
    code, res = cli("trp-train", tiny_llama, "-o", out, *args)
    assert code == 2, res.output
    errors = [ln for ln in res.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and match in errors[0], res.stderr
    assert not out.exists() and not list(tmp_path.iterdir())


def test_refuses_factorized_base(tmp_path, tiny_llama):
    fake = tmp_path / "fact"
    shutil.copytree(tiny_llama, fake)
    cfg = json.loads((fake / "config.json").read_text())
    cfg["lowrank"] = {"format_version": 1, "method": "svd", "ranks": {"model.layers.0.mlp.up_proj": 4}}
    (fake / "config.json").write_text(json.dumps(cfg))
    code, res = cli("trp-train", fake, "-o", tmp_path / "out")
    assert code == 2 and "already factorized" in res.stderr and not (tmp_path / "out").exists()


@pytest.mark.parametrize("command", ["trp-train", "merge"])
def test_help_has_examples(command):
    code, res = cli(command, "--help")
    assert code == 0 and "Examples" in res.stdout and "--json" in res.stdout


def test_defaults_are_the_papers_sgd_and_per_optimizer():
    """SGD momentum 0.9 with lr/lambda from the optimizer's table unless given; AdamW has its own."""
    from lowrank_cli.api.trp import TRPOptions
    from lowrank_cli.methods.trp.optim import MOMENTUM, make_optimizer

    sgd = TRPOptions(output="o").resolved()
    assert (sgd.optimizer, sgd.lr, sgd.nuclear_weight, sgd.energy, sgd.final_rule, sgd.final_threshold) == \
        ("sgd", 1e-3, 3e-4, 0.99, "threshold", 0.05)
    adamw = TRPOptions(output="o", optimizer="adamw").resolved()
    assert (adamw.lr, adamw.nuclear_weight) == (1e-4, 0.0)
    given = TRPOptions(output="o", optimizer="adamw", lr=5e-5, nuclear_weight=1e-3).resolved()
    assert (given.lr, given.nuclear_weight) == (5e-5, 1e-3)
    opt = make_optimizer([torch.nn.Parameter(torch.zeros(2))], "sgd", lr=1e-3)
    assert isinstance(opt, torch.optim.SGD) and opt.defaults["momentum"] == MOMENTUM == 0.9
