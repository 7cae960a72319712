"""`lowrank finetune` and the training loop: loss falls for every method, resume is bit-exact, adapters
reload with plain PEFT and reproduce the trained model, factorized/quantized bases, bad input exits 2."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from lowrank_cli.cli.app import app
from lowrank_cli.errors import UsageError
from lowrank_cli.methods.finetune.spec import METHODS, AdapterSpec
from lowrank_cli.train.data import build_datasets, collate_fn
from lowrank_cli.train.loop import LoopConfig, train

runner = CliRunner()
# every held-out example (as held_out_loss measures), not the default's share of a 6-step run
FAST = ["--max-steps", "6", "--batch-size", "4", "--max-seq-len", "48", "--lr", "5e-3", "--warmup", "1",
        "--max-eval-examples", "256"]


def invoke(*args):
    result = runner.invoke(app, ["finetune", *args, "--json"])
    lines = [ln for ln in result.stdout.splitlines() if ln.strip()]
    assert len(lines) == 1, f"expected one JSON line: {result.stdout!r} {result.stderr!r}"
    return result.exit_code, json.loads(lines[0]), result


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.fixture(scope="module")
def qa_data(tmp_path_factory):
    """Prompt/completion records with a learnable pattern (the answer repeats a word of the prompt)."""
    words = ["alpha", "beta", "gamma", "delta", "import", "return", "class", "while"]
    records = [{"prompt": f"say {w} {i}:", "completion": f" {w} {w} {w}"} for i in range(6) for w in words]
    return write_jsonl(tmp_path_factory.mktemp("data") / "qa.jsonl", records)


@pytest.fixture(scope="module")
def tok(tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tokenizer_dir)


def base_model(path):
    from lowrank_cli.modeling.export import load_model

    return load_model(path, dtype=torch.float32)


def logits_of(model, ids):
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids).logits


def method_or_fail(name):
    """The method's module; a module that lost attach/optimizer/save (or fails to import) FAILS the test:
    every method in METHODS is part of this project, none is optional."""
    from lowrank_cli.methods.finetune.registry import get_method

    try:
        return get_method(name)
    except UsageError as exc:
        pytest.fail(f"{name}: {exc}")


# loldu trains r numbers per layer (the diagonal): it needs a far larger step to move in a few steps
LR = {"lora": 5e-3, "lora-pro": 5e-3, "bone": 5e-3, "loldu": 5e-2}


def small_targets(name):
    # bone's blocks must divide the layer sizes; every method gets the same layers
    return ["q_proj", "v_proj", "down_proj"]


def train_method(name, path, tok, qa, *, steps=8, dropout=0.0, rank=4, checkpoint_dir=None, save_every=None,
                 resume_from=None, callbacks=(), lr=5e-3):
    from lowrank_cli.methods.finetune.targets import module_names, resolve_targets

    method = method_or_fail(name)
    data = build_datasets(tok, str(qa), max_seq_len=48, seed=0)
    torch.manual_seed(0)
    net = base_model(path)
    for p in net.parameters():
        p.requires_grad_(False)
    spec = AdapterSpec(method=name, targets=module_names(resolve_targets(net, small_targets(name), rank=rank)),
                       rank=rank, alpha=2.0 * rank, dropout=dropout)
    net = method.attach(net, spec)
    opt = method.optimizer(net, spec, lr=lr)
    cfg = LoopConfig(max_steps=steps, batch_size=4, grad_accum=2, warmup=1, device="cpu", seed=1,
                     save_every=save_every, eval_every=4, fingerprint={"method": name})
    out = train(net, opt, data.train, config=cfg, collate=collate_fn(tok.pad_token_id), eval_dataset=data.eval,
                checkpoint_dir=checkpoint_dir, resume_from=resume_from, callbacks=callbacks)
    return net, method, spec, out, data


def trainable_state(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


# ------------------------------------------------------------------------------------------ every method


@pytest.mark.parametrize("name", METHODS)
def test_loss_falls_and_adapter_reloads_with_peft(name, tiny_llama, tok, qa_data, tmp_path):
    from peft import PeftModel

    net, method, spec, out, data = train_method(name, tiny_llama, tok, qa_data, lr=LR[name])
    assert out.steps == 8 and len(out.curve) == 8
    assert out.final_eval_loss < out.initial_eval_loss - 0.05, (out.initial_eval_loss, out.final_eval_loss)
    first, last = out.curve[0]["loss"], sum(r["loss"] for r in out.curve[-2:]) / 2
    assert last < first
    ids = torch.tensor([data.eval[0]["input_ids"]])
    trained = logits_of(net, ids)
    method.save(net, tmp_path / "adapter", spec, base_name_or_path=str(tiny_llama))
    reloaded = PeftModel.from_pretrained(base_model(tiny_llama), str(tmp_path / "adapter"))
    assert torch.allclose(logits_of(reloaded, ids), trained, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(logits_of(base_model(tiny_llama), ids), trained, atol=1e-3)


# --------------------------------------------------------------------------------------------------- loop


class Crash(Exception):
    pass


class CountingCallback:
    """Counts steps in its own state (must survive a resume) and can crash the run at a given step."""

    def __init__(self, crash_at=None):
        self.crash_at, self.seen = crash_at, 0

    def on_step_start(self, model, step):
        if step == self.crash_at:
            raise Crash

    def on_before_optimizer_step(self, model, step):
        assert all(p.grad is not None for p in model.parameters() if p.requires_grad)

    def on_step_end(self, model, step, logs):
        self.seen += 1
        logs["seen"] = self.seen

    def state_dict(self):
        return {"seen": self.seen}

    def load_state_dict(self, state):
        self.seen = state["seen"]


def test_resume_is_bit_exact(tiny_llama, tok, qa_data, tmp_path):
    # dropout on: the RNG streams must be restored too, not only weights and optimizer
    straight, _, _, ref, _ = train_method("lora", tiny_llama, tok, qa_data, dropout=0.1, save_every=4,
                                          checkpoint_dir=tmp_path / "a")
    want = trainable_state(straight)
    with pytest.raises(Crash):
        train_method("lora", tiny_llama, tok, qa_data, dropout=0.1, save_every=4, checkpoint_dir=tmp_path / "b",
                     callbacks=[CountingCallback(crash_at=6)])
    assert sorted(p.name for p in (tmp_path / "b").iterdir()) == ["step-000004"]
    cb = CountingCallback()
    resumed, _, _, out, _ = train_method("lora", tiny_llama, tok, qa_data, dropout=0.1, save_every=4,
                                         checkpoint_dir=tmp_path / "b", resume_from=tmp_path / "b", callbacks=[cb])
    got = trainable_state(resumed)
    assert out.resumed_from_step == 4 and out.steps == 8
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    assert [r["loss"] for r in out.curve] == [r["loss"] for r in ref.curve]  # the saved curve continues too
    assert cb.seen == 8 and out.curve[-1]["seen"] == 8
    assert out.final_eval_loss == ref.final_eval_loss


def test_checkpoint_holds_only_trainable_weights(tiny_llama, tok, qa_data, tmp_path):
    net, *_ = train_method("lora", tiny_llama, tok, qa_data, steps=4, save_every=2, checkpoint_dir=tmp_path)
    saved = load_file(str(tmp_path / "step-000002" / "model.safetensors"))
    assert set(saved) == {n for n, p in net.named_parameters() if p.requires_grad}
    assert all("lora_" in k for k in saved)


def test_resume_refuses_another_runs_checkpoint(tiny_llama, tok, qa_data, tmp_path):
    train_method("lora", tiny_llama, tok, qa_data, steps=4, save_every=2, checkpoint_dir=tmp_path)
    with pytest.raises(UsageError, match="another run.*max_steps"):
        train_method("lora", tiny_llama, tok, qa_data, steps=6, save_every=2, checkpoint_dir=tmp_path,
                     resume_from=tmp_path)


def test_schedule_warmup_then_cosine_to_zero(tiny_llama, tok, qa_data):
    _, _, _, out, _ = train_method("lora", tiny_llama, tok, qa_data, steps=8, lr=1e-2)
    lrs = [r["lr"] for r in out.curve]
    assert lrs[0] == pytest.approx(1e-2)  # warmup 1 step: full lr after the first step
    assert all(a >= b for a, b in zip(lrs, lrs[1:], strict=False)) and lrs[-1] == pytest.approx(0.0, abs=1e-12)
    assert all(r["grad_norm"] is not None and r["grad_norm"] > 0 for r in out.curve)


def test_gradient_clipping_bounds_the_update(tiny_llama, tok, qa_data):
    """With max_grad_norm tiny, SGD moves the parameters by at most lr * max_norm per step."""
    from lowrank_cli.methods.finetune import lora

    data = build_datasets(tok, str(qa_data), max_seq_len=48)
    net = base_model(tiny_llama)
    net.requires_grad_(False)
    spec = AdapterSpec("lora", targets=["model.layers.0.mlp.down_proj"], rank=4)
    net = lora.attach(net, spec)
    net.base_model.model.model.layers[0].mlp.down_proj.lora_B.default.weight.data.normal_()
    before = torch.cat([p.detach().flatten().clone() for p in net.parameters() if p.requires_grad])
    sgd = torch.optim.SGD([p for p in net.parameters() if p.requires_grad], lr=1.0)
    cfg = LoopConfig(max_steps=1, batch_size=4, warmup=0, max_grad_norm=1e-3, device="cpu", eval_at_start=False)
    out = train(net, sgd, data.train, config=cfg, collate=collate_fn(0))
    after = torch.cat([p.detach().flatten() for p in net.parameters() if p.requires_grad])
    assert out.curve[0]["grad_norm"] > 1e-3  # the norm before clipping is what gets logged
    assert (after - before).norm() <= 1e-3 * (1 + 1e-4)


# ------------------------------------------------------------------------------------------------ targets


def test_targets_default_every_block_linear_not_lm_head(tiny_llama):
    from lowrank_cli.methods.finetune.targets import module_names, resolve_targets

    names = module_names(resolve_targets(base_model(tiny_llama), None))
    assert len(names) == 2 * 7 and all(n.startswith("model.layers.") for n in names)
    assert "model.layers.1.mlp.down_proj" in names and not any("lm_head" in n for n in names)
    assert module_names(resolve_targets(base_model(tiny_llama), "q_proj,layers.1.mlp.*")) == [
        "model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj", "model.layers.1.mlp.gate_proj",
        "model.layers.1.mlp.up_proj", "model.layers.1.mlp.down_proj"]


def test_targets_errors(tiny_llama):
    from lowrank_cli.methods.finetune.targets import resolve_targets

    net = base_model(tiny_llama)
    with pytest.raises(UsageError, match="'qkv' matches no linear layer"):
        resolve_targets(net, ["qkv"])
    with pytest.raises(UsageError, match="lm_head.*decoder blocks"):
        resolve_targets(net, ["lm_head"])
    with pytest.raises(UsageError, match="--rank 65 is larger than the layer"):
        resolve_targets(net, ["q_proj"], rank=65)


def test_registry_unknown_method_lists_choices():
    from lowrank_cli.methods.finetune.registry import get_method

    with pytest.raises(UsageError, match="unknown --method 'dora' .choose lora, lora-pro, bone, loldu"):
        get_method("dora")


# ---------------------------------------------------------------------------------------------- the command


def test_cli_writes_adapter_curve_and_manifest(tiny_llama, qa_data, tok, tmp_path):
    from peft import PeftModel

    out = tmp_path / "out"
    code, doc, _ = invoke(str(tiny_llama), "--data", str(qa_data), "-o", str(out), "--targets", "q_proj,v_proj",
                          *FAST)
    assert code == 0 and doc["status"] == "ok" and doc["method"] == "lora" and doc["base"] == "dense"
    assert doc["steps"] == 6 and doc["targets"]["modules"] == 4
    assert doc["loss"]["eval_after"] < doc["loss"]["eval_before"]
    assert doc["params"]["trainable"] == 2 * 8 * (64 + 64) + 2 * 8 * (64 + 32)  # r 8; q 64->64, v 64->32
    files = {p.name for p in out.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "lowrank.json", "loss_curve.jsonl",
            "loss_curve.png", "tokenizer.json"} <= files
    rows = [json.loads(line) for line in (out / "loss_curve.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 7)) and "eval_loss" in rows[-1]
    assert {"loss", "lr", "grad_norm", "tokens"} <= rows[0].keys()
    assert (out / "loss_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    manifest = json.loads((out / "lowrank.json").read_text())
    assert manifest["command"] == "finetune" and manifest["metrics"]["loss"] == doc["loss"]
    assert manifest["metrics"]["params"]["trainable"] == doc["params"]["trainable"]
    # the saved adapter is the trained model: its held-out loss is the one the run reported
    model = PeftModel.from_pretrained(base_model(tiny_llama), str(out))
    assert held_out_loss(model, tok, qa_data) == pytest.approx(doc["loss"]["eval_after"], abs=1e-4)
    assert not (tmp_path / ".out.checkpoints").exists()


def test_cli_resume_continues_bit_exactly(tiny_llama, qa_data, tmp_path):
    args = [str(tiny_llama), "--data", str(qa_data), "--dropout", "0.1", "--save-every", "3", *FAST]
    assert invoke(*args, "-o", str(tmp_path / "a"), "--checkpoint-dir", str(tmp_path / "ck"))[0] == 0
    assert (tmp_path / "ck" / "step-000003").is_dir()
    # a fresh run into a folder holding checkpoints is refused
    code, doc, _ = invoke(*args, "-o", str(tmp_path / "b"), "--checkpoint-dir", str(tmp_path / "ck"))
    assert code == 2 and "--resume" in doc["error"]["message"] and not (tmp_path / "b").exists()
    code, doc, _ = invoke(*args, "-o", str(tmp_path / "b"), "--checkpoint-dir", str(tmp_path / "ck"), "--resume")
    assert code == 0 and doc["resumed_from_step"] == 3
    a = load_file(str(tmp_path / "a" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "b" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # another run's options: refused, nothing written
    code, doc, _ = invoke(*args, "-o", str(tmp_path / "c"), "--checkpoint-dir", str(tmp_path / "ck"), "--resume",
                          "--rank", "4")
    assert code == 2 and "another run" in doc["error"]["message"] and "rank" in doc["error"]["message"]
    assert not (tmp_path / "c").exists()


def _assert_nothing_written(tmp_path, out):
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


@pytest.mark.parametrize("case", ["method", "fields", "empty", "targets", "rank", "resume", "bone-variant",
                                  "output"])
def test_bad_input_exits_2_with_nothing_written(case, tiny_llama, qa_data, tmp_path):
    out = tmp_path / "out"
    data = str(qa_data)
    extra = []
    needle = {"method": "unknown --method 'dora'", "fields": "found: answer, question", "empty": "no examples",
              "targets": "matches no linear layer", "rank": "--rank 100 is larger", "resume": "no training checkpoint",
              "bone-variant": "--bone-variant", "output": "required"}[case]
    if case == "method":
        extra = ["--method", "dora"]
    elif case == "fields":
        data = str(write_jsonl(tmp_path / "bad.jsonl", [{"question": "q", "answer": "a"}]))
    elif case == "empty":
        (tmp_path / "empty.jsonl").write_text("")
        data = str(tmp_path / "empty.jsonl")
    elif case == "targets":
        extra = ["--targets", "nothing_like_this"]
    elif case == "rank":
        extra = ["--rank", "100"]
    elif case == "resume":
        extra = ["--resume"]
    elif case == "bone-variant":
        extra = ["--method", "bone", "--bone-variant", "mosaic"]
    args = [str(tiny_llama), "--data", data, *FAST, *extra]
    if case != "output":
        args += ["-o", str(out)]
    before = {p.name for p in tmp_path.iterdir()}
    code, doc, result = invoke(*args)
    assert code == 2, result.output
    assert doc["status"] == "error" and needle in doc["error"]["message"], doc
    assert {p.name for p in tmp_path.iterdir()} == before
    _assert_nothing_written(tmp_path, out)


def test_human_output(tiny_llama, qa_data, tmp_path):
    result = runner.invoke(app, ["finetune", str(tiny_llama), "--data", str(qa_data), "-o", str(tmp_path / "o"),
                                 *FAST])
    assert result.exit_code == 0, result.output
    assert "trainable params" in result.stdout and "eval loss" in result.stdout


# ------------------------------------------------------------------------------------------------- bases


@pytest.fixture(scope="module")
def factorized_llama(tiny_llama, tmp_path_factory):
    out = tmp_path_factory.mktemp("fact") / "llama-svd"
    result = runner.invoke(app, ["decompose", str(tiny_llama), "-o", str(out), "--rank", "16", "--method", "svd",
                                 "--calib-samples", "2", "--seq-len", "64", "--eval-tokens", "128", "--json"])
    assert result.exit_code == 0, result.output
    return out


def test_factorized_base_adapts_both_factors(factorized_llama, qa_data, tmp_path):
    from peft import PeftModel

    out = tmp_path / "out"
    code, doc, _ = invoke(str(factorized_llama), "--data", str(qa_data), "-o", str(out), "--targets", "q_proj",
                          "--rank", "4", *FAST)
    assert code == 0, doc
    assert doc["base"] == "factorized" and doc["targets"] == {
        "layers": 2, "modules": 4, "first": ["model.layers.0.self_attn.q_proj.down", "model.layers.0.self_attn"
                                             ".q_proj.up", "model.layers.1.self_attn.q_proj.down",
                                             "model.layers.1.self_attn.q_proj.up"]}
    assert doc["loss"]["eval_after"] < doc["loss"]["eval_before"]
    model = PeftModel.from_pretrained(base_model(factorized_llama), str(out))
    ids = torch.arange(20).unsqueeze(0)
    assert not torch.allclose(logits_of(model, ids), logits_of(base_model(factorized_llama), ids), atol=1e-4)
    # a LoRA rank above a factor's rank does not fit that factor
    code, doc, _ = invoke(str(factorized_llama), "--data", str(qa_data), "-o", str(tmp_path / "x"), "--targets",
                          "q_proj", "--rank", "32", *FAST)
    assert code == 2 and "q_proj.down" in doc["error"]["message"]


def held_out_loss(model, tok, qa):
    data = build_datasets(tok, str(qa), max_seq_len=48)
    batch = collate_fn(tok.pad_token_id)(data.eval)
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), batch["labels"][:, 1:].flatten(),
                                             ignore_index=-100).item()


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["dense", "factorized"])
def test_qlora_4bit_base(kind, request, qa_data, tok, tmp_path):
    """QLoRA, and QLoRA over LoRD: the factors themselves are 4-bit and adapted."""
    pytest.importorskip("bitsandbytes")
    from peft import PeftModel
    from transformers import BitsAndBytesConfig

    from lowrank_cli.modeling.export import load_model

    base = request.getfixturevalue("tiny_llama" if kind == "dense" else "factorized_llama")
    out = tmp_path / "out"
    code, doc, result = invoke(str(base), "--data", str(qa_data), "-o", str(out), "--load-in-4bit",
                               "--targets", "q_proj,down_proj", "--rank", "4", *FAST)
    assert code == 0, result.output
    assert doc["base"] == ("bnb-4bit" if kind == "dense" else "factorized+bnb-4bit")
    assert doc["loss"]["eval_after"] < doc["loss"]["eval_before"]
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and len(config["target_modules"]) == (4 if kind == "dense" else 8)
    # the adapter on a fresh 4-bit load of the base reproduces the reported held-out loss
    q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                           bnb_4bit_compute_dtype=torch.float32)
    net = load_model(base, dtype=torch.float32, quantization_config=q)
    for module in net.modules():  # as finetune does on CPU (see api/finetune.py)
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
    model = PeftModel.from_pretrained(net, str(out))
    assert held_out_loss(model, tok, qa_data) == pytest.approx(doc["loss"]["eval_after"], abs=1e-4)


@pytest.mark.slow
def test_gptq_base(tiny_llama, qa_data, tmp_path):
    pytest.importorskip("gptqmodel")
    quantized = tmp_path / "gptq"
    result = runner.invoke(app, ["quantize", str(tiny_llama), "-o", str(quantized), "--calib-samples", "4",
                                 "--seq-len", "64", "--eval-tokens", "128", "--group-size", "32", "--json"])
    assert result.exit_code == 0, result.output
    out = tmp_path / "out"
    code, doc, result = invoke(str(quantized), "--data", str(qa_data), "-o", str(out), "--targets", "q_proj", *FAST)
    assert code == 0, result.output
    assert doc["base"] == "gptq" and doc["loss"]["eval_after"] < doc["loss"]["eval_before"]
    code, doc, _ = invoke(str(quantized), "--data", str(qa_data), "-o", str(tmp_path / "x"), "--load-in-4bit",
                          *FAST)
    assert code == 2 and "already quantized" in doc["error"]["message"]


# -------------------------------------------------------------------------------------------------- curve


def test_curve_jsonl_and_png(tmp_path, monkeypatch):
    import logging
    import sys

    from lowrank_cli.train.curve import plot_curve, read_curve_jsonl, write_curve_jsonl

    rows = [{"step": 1, "loss": 3.0, "lr": 1e-3, "grad_norm": 1.5, "tokens": 10},
            {"step": 2, "loss": float("nan"), "lr": 5e-4, "grad_norm": None, "tokens": 20, "eval_loss": 2.5}]
    write_curve_jsonl(rows, tmp_path / "c.jsonl")
    back = read_curve_jsonl(tmp_path / "c.jsonl")
    assert back[0] == rows[0] and back[1]["loss"] is None and back[1]["eval_loss"] == 2.5  # NaN -> null
    assert plot_curve(rows, tmp_path / "c.png", initial_eval=3.2)
    assert (tmp_path / "c.png").read_bytes()[:4] == b"\x89PNG"
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if not installed
    seen = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: seen.append(record.getMessage())
    logging.getLogger("lowrank").addHandler(handler)  # the CLI runner turns propagation off
    try:
        assert plot_curve(rows, tmp_path / "d.png") is False
    finally:
        logging.getLogger("lowrank").removeHandler(handler)
    assert not (tmp_path / "d.png").exists() and any("matplotlib is not installed" in m for m in seen)


@pytest.mark.parametrize("variable", ["ACCELERATE_USE_FSDP", "ACCELERATE_USE_DEEPSPEED"])
def test_lora_pro_and_trp_refuse_sharded_launches(variable, monkeypatch, tmp_path):
    from lowrank_cli.api.finetune import FinetuneOptions
    from lowrank_cli.api.trp import TRPOptions

    monkeypatch.setenv(variable, "true")
    with pytest.raises(UsageError, match="DDP"):
        FinetuneOptions(method="lora-pro", output=str(tmp_path / "o")).validate()
    FinetuneOptions(method="lora", output=str(tmp_path / "o")).validate()  # LoRA shards fine
    with pytest.raises(UsageError, match="DDP"):
        TRPOptions(output=str(tmp_path / "o")).validate()
