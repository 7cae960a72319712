"""Decompose's Fisher sensitivity pass against plain autograd on the whole model, and the LM head's cost."""

from __future__ import annotations

import pytest
import torch

from lowrank_cli.engine.streamed import StreamedModel
from lowrank_cli.io.checkpoint import Checkpoint
from lowrank_cli.methods.decompose import sensitivity
from lowrank_cli.methods.decompose.sensitivity import output_sensitivities
from lowrank_cli.methods.decompose.targets import select_targets


def _windows(vocab: int, n=4, seq=16, seed=0):
    return torch.randint(0, vocab, (n, seq), generator=torch.Generator().manual_seed(seed))


def _streamed_pass(path, windows, batch_size=2, autocast=None):
    """output_sensitivities with block-boundary activations built by the engine's own forward."""
    streamed = StreamedModel(Checkpoint(path))
    targets = select_targets(streamed.model, streamed.blocks_name, None)
    acts = streamed.capture(windows, batch_size)
    boundaries = [acts]
    for i in range(streamed.num_blocks):
        streamed.load_block(i)
        acts = streamed.run_block(i, acts)
        boundaries.append(acts)
        streamed.free_block(i)
    return output_sensitivities(streamed, windows, boundaries, targets, batch_size, autocast=autocast), targets


def _autograd_reference(path, windows, targets):
    """The whole model in float64, summed next-token cross-entropy, one backward: mean over predicted tokens
    of |dLoss/dy|^2 / m for every target's output y (an independent gradient: no streaming, no hand-made
    head)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float64).eval()
    outputs = {}

    def keep(name):
        def hook(module, inputs, output):
            output.retain_grad()
            outputs[name] = output
        return hook

    handles = [model.get_submodule(t.name).register_forward_hook(keep(t.name)) for t in targets]
    logits = model(input_ids=windows).logits
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                             windows[:, 1:].reshape(-1), reduction="sum")
    loss.backward()
    for h in handles:
        h.remove()
    tokens = windows[:, 1:].numel()
    return {t.name: float(outputs[t.name].grad.pow(2).sum()) / tokens / t.m for t in targets}


def _softcapped(tmp_path_factory, tokenizer_dir):
    """A tiny Gemma-2 (final-logit soft-capping 30, tied head): the head transform the hand-made gradient
    must reproduce."""
    from transformers import AutoModelForCausalLM, Gemma2Config

    config = Gemma2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                          num_key_value_heads=2, head_dim=16, vocab_size=512, max_position_embeddings=64,
                          final_logit_softcapping=3.0, attn_logit_softcapping=None, sliding_window=16)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():  # large logits, so the soft-capping really bends them
        model.lm_head.weight.mul_(40.0)
    folder = tmp_path_factory.mktemp("gemma2")
    model.save_pretrained(folder)
    return folder


@pytest.mark.parametrize("kind", ["llama", "gpt_bigcode", "gemma2"])
def test_fisher_pass_equals_autograd_on_the_whole_model(kind, tiny_llama, tiny_bigcode, tmp_path_factory,
                                                        tokenizer_dir):
    path = {"llama": tiny_llama, "gpt_bigcode": tiny_bigcode}.get(kind) or _softcapped(tmp_path_factory,
                                                                                         tokenizer_dir)
    windows = _windows(512)
    ours, targets = _streamed_pass(path, windows)
    ref = _autograd_reference(path, windows, targets)
    assert len(ours) == len(targets) > 4
    for name, value in ref.items():
        assert value > 0
        assert ours[name] == pytest.approx(value, rel=2e-4), name


def _large_vocab_llama(folder, vocab):
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=vocab, max_position_embeddings=64,
                         tie_word_embeddings=False)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    return folder


def _matmul_flops(fn):
    """(floating-point operations of the matrix products fn runs, as torch's profiler counts them, result)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], with_flops=True) as prof:
        result = fn()
    return sum(e.flops for e in prof.events() if e.flops), result


def test_head_gradient_is_two_matmuls_per_token_in_small_chunks(tmp_path, monkeypatch):
    """Counted floating-point operations of the final hidden states' gradient on a model with a 65k
    vocabulary: the head's forward matmul and one matmul back to its input (2 units of tokens x vocabulary x
    hidden, the least an exact gradient needs; autograd.grad through the head costs the same but holds the
    whole batch's logits and their gradient). With one token per chunk the gradient is unchanged."""
    vocab, hidden = 65536, 32
    path = _large_vocab_llama(tmp_path / "big-vocab", vocab)
    windows = _windows(vocab, n=2, seq=32)
    streamed = StreamedModel(Checkpoint(path))
    hidden_states = next(iter(streamed.run_blocks(streamed.capture(windows, 2))))
    unit = 2 * windows.numel() * vocab * hidden  # one head matmul over every position

    def counted(by_hand: bool):
        head = sensitivity._HeadGradient(streamed)
        head.checked = True  # the first-batch check is measured apart below
        head.by_hand = by_hand
        flops, grad = _matmul_flops(lambda: head.hidden_grad(hidden_states, windows))
        return flops / unit, grad

    with streamed._outer_loaded():
        ours, grad = counted(True)
        theirs, ref = counted(False)
        head = sensitivity._HeadGradient(streamed)
        assert head.by_hand
        checked = _matmul_flops(lambda: head.hidden_grad(hidden_states, windows))[0] / unit  # + the check
        assert head.by_hand  # the check passed: a plain linear head
    torch.testing.assert_close(grad, ref, rtol=1e-4, atol=1e-6)
    assert 1.9 < ours < 2.05 and 1.9 < theirs < 2.05 and checked < ours + 0.3  # the check: 8 of 64 positions, twice
    monkeypatch.setattr(sensitivity, "CHUNK_LOGITS", vocab)  # one token's logits at a time
    with streamed._outer_loaded():
        _, one_by_one = counted(True)
    torch.testing.assert_close(one_by_one, grad, rtol=1e-3, atol=5e-5)
    print(f"head cost in units of one head matmul: by hand {ours:.2f} (+check {checked - ours:.2f}), "
          f"autograd {theirs:.2f}")


# -- the steering precision (lowrank_cli/engine/precision.py) ----------------------------------------------------
def test_bfloat16_sensitivities_agree_with_float32(tiny_llama, monkeypatch):
    """The whole pass under bfloat16 autocast (blocks and the head's chunked matmuls): every sensitivity within
    a few % of float32's (the estimate's own window-to-window noise is ~30%); the hand-made head is still
    used (its check against the model's logits runs in float32); float32 is the pass as it was (autograd
    reference above), and the head's chunks really ran in bfloat16."""
    windows = _windows(512, n=4, seq=32)
    f32, targets = _streamed_pass(tiny_llama, windows)
    seen = []
    real_logits = sensitivity._HeadGradient._logits

    def spy(self, z, weight=None):
        seen.append((weight if weight is not None else self.head.weight).dtype)
        return real_logits(self, z, weight)

    monkeypatch.setattr(sensitivity._HeadGradient, "_logits", spy)
    bf16, _ = _streamed_pass(tiny_llama, windows, autocast=torch.bfloat16)
    assert seen[0] == torch.float32 and set(seen[1:]) == {torch.bfloat16}  # the check, then the chunks
    assert bf16.keys() == f32.keys()
    for name, value in f32.items():
        assert value > 0
        assert bf16[name] == pytest.approx(value, rel=0.03), name
    assert any(bf16[n] != f32[n] for n in f32)  # it did run differently


def test_square_sum_matches_float64():
    g = torch.randn(3, 257, 96, generator=torch.Generator().manual_seed(0))
    exact = float(g.double().pow(2).sum())
    assert sensitivity._square_sum(g) == pytest.approx(exact, rel=1e-5)
    assert sensitivity._square_sum(g.bfloat16()) == pytest.approx(float(g.bfloat16().double().pow(2).sum()),
                                                                  rel=1e-5)


def test_steering_dtype_choices(monkeypatch):
    from lowrank_cli.engine import precision

    monkeypatch.setattr(precision, "fast_bfloat16", lambda device: True)
    assert precision.steering_dtype("auto", "cpu", torch.float32) == torch.bfloat16
    assert precision.steering_dtype("auto", "cpu", torch.bfloat16) is None  # already 16-bit: no autocast
    assert precision.steering_dtype("auto", "cuda", torch.float16) is None
    assert precision.steering_dtype("float32", "cpu", torch.float32) is None
    monkeypatch.setattr(precision, "fast_bfloat16", lambda device: False)
    assert precision.steering_dtype("auto", "cpu", torch.float32) is None
    assert precision.steering_dtype("bfloat16", "cpu", torch.float32) == torch.bfloat16  # forced
    with pytest.raises(ValueError, match="float16"):
        precision.steering_dtype("float16", "cpu", torch.float32)


def test_fast_bfloat16_reads_the_cpu_probes(monkeypatch):
    """AMX-BF16 or AVX512-BF16 -> fast; neither, or probes this torch lacks (private API) -> not fast."""
    from lowrank_cli.engine.precision import fast_bfloat16

    for amx, avx, want in [(True, False, True), (False, True, True), (False, False, False)]:
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda a=amx: a, raising=False)
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda v=avx: v, raising=False)
        assert fast_bfloat16("cpu") is want
    monkeypatch.delattr(torch.cpu, "_is_amx_tile_supported", raising=False)
    monkeypatch.delattr(torch.cpu, "_is_avx512_bf16_supported", raising=False)
    assert fast_bfloat16("cpu") is False

    def broken():
        raise RuntimeError("no cpuinfo")

    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", broken, raising=False)
    assert fast_bfloat16("cpu") is False
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert fast_bfloat16("cuda:0") is False
