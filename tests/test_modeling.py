"""Factorized-checkpoint format: the self-contained modeling file, the exporter helpers and both loaders.

Every checkpoint here is written by hand (safetensors + json + write_modeling_file) from a tiny random model,
so the tests pin the on-disk format rather than any one writer. Offline, CPU, float32.
"""

from __future__ import annotations

import ast
import copy
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn
from transformers import (
    AutoModelForCausalLM,
    GPTBigCodeConfig,
    GPTBigCodeForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    Qwen2Config,
)

from lowrank_cli.errors import UsageError
from lowrank_cli.modeling import export
from lowrank_cli.modeling import lowrank_modeling as lm

REPO = Path(__file__).resolve().parents[1]
ATOL = 1e-5


# --------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module", autouse=True)
def _isolated_modules_cache(tmp_path_factory):
    """Keep transformers' remote-code copies (HF_MODULES_CACHE) out of ~/.cache and the repository.

    transformers reads HF_MODULES_CACHE once, at import, into dynamic_module_utils; patch that module global
    and restore sys.path (init_hf_modules appends the cache folder to it) afterwards.
    """
    import transformers.dynamic_module_utils as dmu

    cache = tmp_path_factory.mktemp("hf_modules")
    saved_path = list(sys.path)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(dmu, "HF_MODULES_CACHE", str(cache))
        yield cache
    sys.path[:] = saved_path


def _common(**kw):
    return dict(
        vocab_size=128,
        max_position_embeddings=64,
        initializer_range=0.1,  # larger than the default, so logits are far from 0 and differences show
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        **kw,
    )


def llama_config(**kw):
    return LlamaConfig(
        **_common(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  intermediate_size=128, **kw)
    )


def mistral_config(**kw):
    return MistralConfig(
        **_common(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  intermediate_size=128, sliding_window=None, **kw)
    )


def qwen2_config(**kw):
    return Qwen2Config(
        **_common(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  intermediate_size=128, **kw)
    )


def bigcode_config(**kw):
    return GPTBigCodeConfig(
        **_common(n_embd=64, n_layer=2, n_head=4, multi_query=True, n_inner=128, **kw)
    )


CONFIGS = {
    "llama": llama_config, "mistral": mistral_config, "qwen2": qwen2_config, "gpt_bigcode": bigcode_config,
}

# Modules to factorize per model type, with ranks below min(m, n) so truncation really changes the model.
RANKS = {
    "llama": {
        "model.layers.0.self_attn.q_proj": 8,
        "model.layers.1.self_attn.k_proj": 4,  # GQA: 64 -> 32
        "model.layers.0.mlp.down_proj": 16,
        "model.layers.1.mlp.gate_proj": 12,
    },
    "mistral": {"model.layers.0.self_attn.o_proj": 8, "model.layers.1.mlp.up_proj": 16},
    "qwen2": {
        "model.layers.0.self_attn.q_proj": 8,  # qwen2 q/k/v carry a bias
        "model.layers.1.self_attn.v_proj": 4,
        "model.layers.1.mlp.down_proj": 16,
    },
    "gpt_bigcode": {
        "transformer.h.0.attn.c_attn": 16,  # MQA fused qkv: 64 -> 64 + 2*16, with bias
        "transformer.h.1.attn.c_proj": 8,
        "transformer.h.0.mlp.c_fc": 12,
        "transformer.h.1.mlp.c_proj": 10,
    },
}


def tiny_model(model_type: str, seed: int = 0, **kw):
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(CONFIGS[model_type](**kw), dtype=torch.float32)
    return model.eval()


def input_ids(seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 128, (2, 12), generator=g)


@torch.no_grad()
def logits_of(model, ids=None):
    ids = input_ids() if ids is None else ids
    return model(input_ids=ids).logits.float()


def svd_factors(weight: torch.Tensor, rank: int):
    """Truncated SVD in float64, split symmetrically: (up m x r, down r x n) in the weight's dtype."""
    u, s, vh = torch.linalg.svd(weight.double(), full_matrices=False)
    root = s[:rank].sqrt()
    up = (u[:, :rank] * root).to(weight.dtype).contiguous()
    down = (root[:, None] * vh[:rank]).to(weight.dtype).contiguous()
    return up, down


def write_factorized(model, ranks: dict[str, int], out: Path, *, method: str = "svd", config_edit=None):
    """Write `model` with `ranks` factorized as a format-1 checkpoint; return the dense reference model.

    The reference is a deep copy of `model` whose factorized linears hold up @ down (float64 product) as
    their dense weight: what the loaded factorized model must compute.
    """
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    reference = copy.deepcopy(model)
    for name, rank in ranks.items():
        w = state.pop(f"{name}.weight")
        bias = state.pop(f"{name}.bias", None)
        up, down = svd_factors(w, rank)
        state[f"{name}.up.weight"] = up
        state[f"{name}.down.weight"] = down
        if bias is not None:
            state[f"{name}.up.bias"] = bias
        # A fresh Parameter: never write through a tied parameter (lm_head <-> embeddings) of the reference.
        ref_linear = reference.get_submodule(name)
        ref_linear.weight = nn.Parameter((up.double() @ down.double()).to(w.dtype))
    # An untouched tied lm_head shares the embedding's storage: store it once, as save_pretrained does.
    tied = getattr(model, "all_tied_weights_keys", {}) or {}
    for target in tied:
        if target in state and not any(target.startswith(n + ".") for n in ranks):
            state.pop(target)
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    cfg = export.lowrank_config(model.config.to_dict(), ranks, method)
    if config_edit:
        config_edit(cfg)
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    export.write_modeling_file(out, model.config.model_type)
    return reference


def remote_load(path: Path, **kw):
    model, info = AutoModelForCausalLM.from_pretrained(
        path, trust_remote_code=True, dtype=torch.float32, output_loading_info=True, **kw
    )
    return model.eval(), info


def lowrank_modules(model) -> dict[str, int]:
    """{name: rank} of the factorized modules, by class name (the remote class is a different object)."""
    return {n: m.rank for n, m in model.named_modules() if type(m).__name__ == "LowRankLinear"}


def assert_clean_load(info):
    assert not info["missing_keys"], info["missing_keys"]
    assert not info["unexpected_keys"], info["unexpected_keys"]
    assert not info.get("mismatched_keys"), info.get("mismatched_keys")


# --------------------------------------------------------------------------------- (1) + (2) round trip


@pytest.mark.parametrize("model_type", ["llama", "gpt_bigcode", "mistral", "qwen2"])
def test_remote_code_and_load_model_match_reference(model_type, tmp_path):
    model = tiny_model(model_type)
    ranks = RANKS[model_type]
    out = tmp_path / "ckpt"
    reference = write_factorized(model, ranks, out)

    remote, info = remote_load(out)
    assert_clean_load(info)
    assert type(remote).__name__ == "LowRankForCausalLM"
    assert type(remote).__module__.startswith("transformers_modules.")  # really the folder's own file
    assert isinstance(remote, type(model))  # subclass of the native class for this model type
    assert lowrank_modules(remote) == ranks
    for name, rank in ranks.items():
        mod = remote.get_submodule(name)
        assert type(mod.down).__name__ == "Linear" and type(mod.up).__name__ == "Linear"
        assert tuple(mod.down.weight.shape) == (rank, mod.in_features)
        assert tuple(mod.up.weight.shape) == (mod.out_features, rank)
        # the factors are the ones on disk, not re-initialised
        ref_w = reference.get_submodule(name).weight
        torch.testing.assert_close(export.dense_weight(mod.up, mod.down), ref_w, atol=1e-6, rtol=1e-5)

    expected = logits_of(reference)
    got = logits_of(remote)
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=ATOL)
    # ... and the truncation is really in effect (the test could not pass with dense weights)
    assert (got - logits_of(model)).abs().max() > 1e-3

    own = export.load_model(out, dtype=torch.float32)
    assert isinstance(own, lm.make_lowrank_class(type(model)))
    assert type(own).__module__ == lm.__name__
    assert {n: m.rank for n, m in own.named_modules() if isinstance(m, lm.LowRankLinear)} == ranks
    assert not own.training
    torch.testing.assert_close(logits_of(own), got, atol=1e-6, rtol=0)


@pytest.mark.parametrize("loader", ["load_model", "remote"])
def test_save_pretrained_of_loaded_model_is_a_complete_checkpoint(loader, tmp_path):
    model = tiny_model("llama", tie_word_embeddings=True)
    ranks = {"lm_head": 16, **RANKS["llama"]}
    reference = write_factorized(model, ranks, tmp_path / "ckpt", method="svd-llm")
    expected = logits_of(reference)
    ckpt = tmp_path / "ckpt"
    loaded = export.load_model(ckpt) if loader == "load_model" else remote_load(ckpt)[0]
    loaded.save_pretrained(tmp_path / "saved")

    assert (tmp_path / "saved" / export.MODELING_FILE).is_file()
    cfg = json.loads((tmp_path / "saved" / "config.json").read_text())
    assert cfg["lowrank"] == {"format_version": 1, "method": "svd-llm", "ranks": ranks}
    assert cfg["auto_map"] == export.AUTO_MAP and cfg["architectures"] == ["LowRankForCausalLM"]
    assert cfg["tie_word_embeddings"] is False
    again, info = remote_load(tmp_path / "saved")
    assert_clean_load(info)
    assert lowrank_modules(again) == ranks
    torch.testing.assert_close(logits_of(again), expected, atol=ATOL, rtol=ATOL)
    own = export.load_model(tmp_path / "saved")
    torch.testing.assert_close(logits_of(own), expected, atol=ATOL, rtol=ATOL)


def test_load_model_reads_ordinary_checkpoint(tmp_path):
    model = tiny_model("llama")
    model.save_pretrained(tmp_path / "plain")
    loaded = export.load_model(tmp_path / "plain", dtype="float32")
    assert type(loaded) is LlamaForCausalLM
    assert not any(isinstance(m, lm.LowRankLinear) for m in loaded.modules())
    torch.testing.assert_close(logits_of(loaded), logits_of(model), atol=1e-6, rtol=0)


def test_load_model_rejects_checkpoint_that_does_not_match_ranks(tmp_path):
    model = tiny_model("llama")
    ranks = {"model.layers.0.self_attn.q_proj": 8}
    out = tmp_path / "ckpt"
    write_factorized(model, ranks, out)
    from safetensors.torch import load_file

    state = load_file(str(out / "model.safetensors"))
    del state["model.layers.0.self_attn.q_proj.down.weight"]
    dense = model.model.layers[0].self_attn.q_proj.weight.detach().clone()
    state["model.layers.0.self_attn.q_proj.weight"] = dense
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(UsageError, match="does not match its lowrank ranks") as err:
        export.load_model(out)
    assert "q_proj.down.weight" in str(err.value) and "q_proj.weight" in str(err.value)


def test_load_model_rejects_newer_format_and_missing_config(tmp_path):
    model = tiny_model("llama")
    out = tmp_path / "ckpt"
    write_factorized(
        model, {"model.layers.0.mlp.up_proj": 8}, out,
        config_edit=lambda c: c["lowrank"].update(format_version=export.FORMAT_VERSION + 1),
    )
    with pytest.raises(UsageError, match="format version"):
        export.load_model(out)
    with pytest.raises(UsageError, match="no config.json"):
        export.load_model(tmp_path / "nowhere")


# ------------------------------------------------------------------------------ (3) self-contained file


def _top_level_imports(source: str) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, "relative import"
            names.add(node.module.split(".")[0])
        elif isinstance(node, ast.Call) and getattr(node.func, "id", None) in ("__import__", "exec", "eval"):
            names.add(f"<{node.func.id}>")
    return names


@pytest.mark.parametrize("model_type", ["llama", "gpt_bigcode", "mistral", "qwen2"])
def test_modeling_file_imports_only_torch_and_transformers(model_type, tmp_path):
    path = export.write_modeling_file(tmp_path, model_type)
    assert path == tmp_path / export.MODELING_FILE
    source = path.read_text()
    assert _top_level_imports(source) == {"torch", "transformers"}
    # the tail names the native base class and defines the class transformers looks up by name
    tree = ast.parse(source)
    base = export.causal_lm_class_name(model_type)
    assert any(
        isinstance(n, ast.ImportFrom) and n.module == "transformers" and n.names[0].name == base
        for n in tree.body
    )
    assert any(
        isinstance(n, ast.Assign) and [t.id for t in n.targets] == ["LowRankForCausalLM"] for n in tree.body
    )
    # no leftover files (the atomic write's temp file)
    assert sorted(p.name for p in tmp_path.iterdir()) == [export.MODELING_FILE]
    # transformers' own import check accepts it
    from transformers.dynamic_module_utils import get_imports

    assert set(get_imports(path)) == {"torch", "transformers"}


def test_template_module_imports_only_torch_and_transformers():
    assert _top_level_imports(Path(lm.__file__).read_text()) <= {"torch", "transformers"}


def test_checkpoint_loads_where_lowrank_cli_cannot_be_imported(tmp_path, _isolated_modules_cache):
    """The promise of the format: a machine without our package loads the folder with remote code."""
    model = tiny_model("llama")
    out = tmp_path / "ckpt"
    reference = write_factorized(model, RANKS["llama"], out)
    torch.save(logits_of(reference), tmp_path / "expected.pt")
    script = textwrap.dedent(
        f"""
        import sys
        sys.modules["lowrank_cli"] = None  # any import of it now raises ImportError
        import torch
        from transformers import AutoModelForCausalLM
        m = AutoModelForCausalLM.from_pretrained({str(out)!r}, trust_remote_code=True, dtype=torch.float32)
        assert type(m).__name__ == "LowRankForCausalLM", type(m)
        ids = torch.randint(3, 128, (2, 12), generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            got = m(input_ids=ids).logits
        expected = torch.load({str(tmp_path / "expected.pt")!r})
        torch.testing.assert_close(got, expected, atol={ATOL}, rtol={ATOL})
        assert not [k for k in sys.modules if k.startswith("lowrank_cli.")]
        print("OK")
        """
    )
    env = dict(os.environ, HF_MODULES_CACHE=str(tmp_path / "modules"), HF_HUB_OFFLINE="1")
    env.pop("PYTHONPATH", None)
    proc = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().endswith("OK")


# ------------------------------------------------------------------------- (4) factorized tied lm_head


@pytest.mark.parametrize("model_type", ["llama", "gpt_bigcode", "qwen2"])
@pytest.mark.parametrize("keep_tie_flag", [False, True])
def test_factorized_lm_head_on_tied_embeddings(model_type, keep_tie_flag, tmp_path):
    model = tiny_model(model_type, tie_word_embeddings=True)
    emb = model.get_input_embeddings().weight
    assert model.lm_head.weight is emb  # really tied
    ranks = {"lm_head": 16, **dict(list(RANKS[model_type].items())[:1])}
    out = tmp_path / "ckpt"

    def keep_tie(cfg):
        # lowrank_config unties; a hand-edited config that still says "tied" must load correctly too
        assert cfg["tie_word_embeddings"] is False
        if keep_tie_flag:
            cfg["tie_word_embeddings"] = True

    reference = write_factorized(model, ranks, out, config_edit=keep_tie)
    assert reference.lm_head.weight is not reference.get_input_embeddings().weight
    expected = logits_of(reference)

    remote, info = remote_load(out)
    assert_clean_load(info)
    own = export.load_model(out, dtype=torch.float32)
    for loaded in (remote, own):
        assert type(loaded.lm_head).__name__ == "LowRankLinear" and loaded.lm_head.rank == 16
        # the input embedding is the stored one, not overwritten from (or tied to) the head
        torch.testing.assert_close(loaded.get_input_embeddings().weight, emb, atol=0, rtol=0)
        assert not any(k.startswith("lm_head") or v.startswith("lm_head")
                       for k, v in loaded.all_tied_weights_keys.items())
        torch.testing.assert_close(logits_of(loaded), expected, atol=ATOL, rtol=ATOL)
        # re-tying on demand (recompute_mapping=True) must not touch the factorized head either
        loaded.tie_weights()
        torch.testing.assert_close(logits_of(loaded), expected, atol=ATOL, rtol=ATOL)


# ------------------------------------------------- (5) the remote class does not hijack plain checkpoints


def test_plain_checkpoint_still_loads_after_remote_code_load(tmp_path):
    model = tiny_model("llama")
    write_factorized(model, RANKS["llama"], tmp_path / "lowrank")
    remote, _ = remote_load(tmp_path / "lowrank")
    remote_cls = type(remote)

    plain = tiny_model("llama", seed=5)
    plain.save_pretrained(tmp_path / "plain")
    expected = logits_of(plain)

    again = AutoModelForCausalLM.from_pretrained(tmp_path / "plain", dtype=torch.float32).eval()
    assert not lowrank_modules(again)
    torch.testing.assert_close(logits_of(again), expected, atol=1e-6, rtol=0)

    # Even if transformers routed the plain config to the remote class (it registers it for non-native
    # config classes), that class must behave as the plain base class without a lowrank section.
    via_remote_cls, info = remote_cls.from_pretrained(
        tmp_path / "plain", dtype=torch.float32, output_loading_info=True
    )
    assert_clean_load(info)
    assert not lowrank_modules(via_remote_cls)
    torch.testing.assert_close(logits_of(via_remote_cls.eval()), expected, atol=1e-6, rtol=0)


# ---------------------------------------------------------------------------- (6) full rank is exact


@pytest.mark.parametrize("model_type", ["llama", "gpt_bigcode"])
def test_full_rank_factors_reproduce_dense_model(model_type, tmp_path):
    model = tiny_model(model_type)
    ranks = {}
    for name in RANKS[model_type]:
        w = model.get_submodule(name).weight
        ranks[name] = min(w.shape)
    write_factorized(model, ranks, tmp_path / "ckpt")
    expected = logits_of(model)
    remote, info = remote_load(tmp_path / "ckpt")
    assert_clean_load(info)
    assert lowrank_modules(remote) == ranks
    torch.testing.assert_close(logits_of(remote), expected, atol=ATOL, rtol=ATOL)
    own = export.load_model(tmp_path / "ckpt")
    torch.testing.assert_close(logits_of(own), expected, atol=ATOL, rtol=ATOL)


# ------------------------------------------------------------- transformers' dynamic-module cache


def test_same_basename_folders_do_not_share_stale_code(tmp_path, _isolated_modules_cache):
    """transformers 5 copies a local modeling file to
    HF_MODULES_CACHE/transformers_modules/<folder basename>/<hash of the file text>/ and imports it
    from there."""
    # same basename, different model types (different file text) -> different base classes
    llama_dir, bigcode_dir = tmp_path / "a" / "ckpt", tmp_path / "b" / "ckpt"
    llama_ref = write_factorized(tiny_model("llama"), {"model.layers.0.self_attn.q_proj": 8}, llama_dir)
    bigcode_ref = write_factorized(tiny_model("gpt_bigcode"), {"transformer.h.0.attn.c_attn": 8}, bigcode_dir)
    m1, _ = remote_load(llama_dir)
    m2, _ = remote_load(bigcode_dir)
    assert isinstance(m1, LlamaForCausalLM) and isinstance(m2, GPTBigCodeForCausalLM)
    torch.testing.assert_close(logits_of(m1), logits_of(llama_ref), atol=ATOL, rtol=ATOL)
    torch.testing.assert_close(logits_of(m2), logits_of(bigcode_ref), atol=ATOL, rtol=ATOL)

    # same basename, same file text, different ranks: the code is shared, the ranks come from each config
    other_dir = tmp_path / "c" / "ckpt"
    other_ref = write_factorized(
        tiny_model("llama", seed=3), {"model.layers.0.self_attn.q_proj": 20}, other_dir
    )
    m3, _ = remote_load(other_dir)
    assert lowrank_modules(m3) == {"model.layers.0.self_attn.q_proj": 20}
    assert lowrank_modules(m1) == {"model.layers.0.self_attn.q_proj": 8}
    torch.testing.assert_close(logits_of(m3), logits_of(other_ref), atol=ATOL, rtol=ATOL)

    # the file in a folder changes (re-export by a newer version): the new text is what runs
    marked = []
    for marker in ("first", "second"):
        path = export.write_modeling_file(llama_dir, "llama")
        path.write_text(path.read_text() + f"\nLOWRANK_TEST_MARKER = {marker!r}\n")
        m, _ = remote_load(llama_dir)
        assert sys.modules[type(m).__module__].LOWRANK_TEST_MARKER == marker
        marked.append(type(m).__module__)

    # module names: transformers_modules.<folder basename>.<hash of the file text>.modeling_lowrank
    names = [type(m).__module__ for m in (m1, m2, m3)] + marked
    assert all(n.startswith("transformers_modules.ckpt.") and n.endswith(".modeling_lowrank") for n in names)
    assert names[0] == names[2]  # same text -> same module (harmless: ranks come from the config)
    assert len({names[0], names[1], *marked}) == 4  # different text -> different module
    assert (Path(_isolated_modules_cache) / "transformers_modules" / "ckpt").is_dir()
    assert not (REPO / "transformers_modules").exists()
    assert not (REPO / "tests" / "transformers_modules").exists()


# ------------------------------------------------------------------------------------ unit tests


def test_low_rank_linear_shapes_forward_and_weight():
    torch.manual_seed(0)
    layer = lm.LowRankLinear(12, 20, 5, bias=True)
    assert (layer.in_features, layer.out_features, layer.rank) == (12, 20, 5)
    assert isinstance(layer.down, nn.Linear) and layer.down.bias is None
    assert isinstance(layer.up, nn.Linear) and layer.up.bias is not None
    x = torch.randn(3, 12)
    torch.testing.assert_close(layer(x), x @ layer.weight.T + layer.up.bias)
    assert "rank=5" in repr(layer)
    # read-only: a write into .weight never reaches the factors
    before = layer.up.weight.detach().clone()
    layer.weight.zero_()
    torch.testing.assert_close(layer.up.weight, before, atol=0, rtol=0)
    with pytest.raises((AttributeError, KeyError)):
        layer.weight = nn.Parameter(torch.zeros(20, 12))
    assert set(layer.state_dict()) == {"down.weight", "up.weight", "up.bias"}
    with pytest.raises(ValueError):
        lm.LowRankLinear(12, 20, 0)


def test_factorize_modules_on_meta_and_errors():
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(llama_config(), dtype=torch.bfloat16)
    lm.factorize_modules(model, {"model.layers.0.self_attn.q_proj": 8, "lm_head": 4})
    q = model.model.layers[0].self_attn.q_proj
    assert isinstance(q, lm.LowRankLinear) and q.rank == 8
    assert q.down.weight.device.type == "meta" and q.up.weight.dtype == torch.bfloat16
    assert model.lm_head.up.weight.shape == (128, 4)
    # idempotent at the same rank, an error at another
    lm.factorize_modules(model, {"lm_head": 4})
    with pytest.raises(ValueError, match="already factorized"):
        lm.factorize_modules(model, {"lm_head": 5})
    with pytest.raises(ValueError, match="only nn.Linear"):
        lm.factorize_modules(model, {"model.embed_tokens": 4})
    with pytest.raises(ValueError, match="does not have"):
        lm.factorize_modules(model, {"model.layers.9.mlp.up_proj": 4})
    with pytest.raises(ValueError, match=">= 1"):
        lm.factorize_modules(model, {"model.layers.1.mlp.up_proj": 0})


def test_bigcode_weight_init_never_touches_factors():
    """GPTBigCode's _init_weights writes module.c_proj.weight; a factorized c_proj must survive it."""
    config = bigcode_config()
    config.lowrank = {"format_version": 1, "method": "svd", "ranks": {
        "transformer.h.0.attn.c_proj": 8, "transformer.h.1.mlp.c_proj": 8}}
    cls = lm.make_lowrank_class(GPTBigCodeForCausalLM)
    torch.manual_seed(0)
    model = cls(config)  # builds, initialises, factorizes, initialises the new factors
    attn_proj = model.transformer.h[0].attn.c_proj
    assert isinstance(attn_proj, lm.LowRankLinear)
    assert attn_proj.down._is_hf_initialized and attn_proj.up._is_hf_initialized
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}

    # the nested GPTBigCodeModel uses its own _init_weights (not the subclass's): call it on the parents
    model.transformer._init_weights(model.transformer.h[0].attn)
    model.transformer._init_weights(model.transformer.h[1].mlp)
    # what from_pretrained does after loading: every loaded parameter is flagged, modules are not
    for p in model.parameters():
        p._is_hf_initialized = True
    for m in model.modules():
        m.__dict__.pop("_is_hf_initialized", None)
    del model.transformer.h[0].attn.c_attn.weight._is_hf_initialized  # one "missing" dense weight
    model.initialize_weights()
    after = model.state_dict()
    for key in before:
        if key != "transformer.h.0.attn.c_attn.weight":
            torch.testing.assert_close(after[key], before[key], atol=0, rtol=0, msg=key)
    # the pass really ran: the missing dense weight was initialised
    key = "transformer.h.0.attn.c_attn.weight"
    assert not torch.equal(after[key], before[key])
    assert attn_proj._weight_placeholder is None  # the init-time placeholder is gone again


def test_init_pass_reaches_factorized_c_proj_without_dense_product(monkeypatch):
    """With transformers' custom-code shortcut off, GPTBigCode's parent-level init does reach c_proj.weight:
    it must get the cheap placeholder, not a dense product, and must leave the factors alone."""
    config = bigcode_config()
    config.lowrank = {"format_version": 1, "method": "svd", "ranks": {"transformer.h.0.attn.c_proj": 8}}
    cls = lm.make_lowrank_class(GPTBigCodeForCausalLM)
    torch.manual_seed(0)
    model = cls(config)
    reads = []
    getter = lm.LowRankLinear.weight.fget

    def counting(self):
        value = getter(self)
        reads.append(value.device.type)
        return value

    monkeypatch.setattr(lm.LowRankLinear, "weight", property(counting))
    monkeypatch.setattr(cls, "is_custom_code", classmethod(lambda c: False))
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    for p in model.parameters():
        p._is_hf_initialized = True
    for m in model.modules():
        m.__dict__.pop("_is_hf_initialized", None)
    model.initialize_weights()
    assert reads == ["meta"]  # GPTBigCode's init touched c_proj.weight once, and got the placeholder
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, before[key], atol=0, rtol=0, msg=key)
    reads.clear()
    assert model.transformer.h[0].attn.c_proj.weight.device.type == "cpu" and reads == ["cpu"]


def test_make_lowrank_class_is_cached_and_plain_without_section():
    cls = lm.make_lowrank_class(LlamaForCausalLM)
    assert lm.make_lowrank_class(LlamaForCausalLM) is cls
    assert cls.__name__ == cls.__qualname__ == "LowRankForCausalLM"
    assert cls.config_class is LlamaConfig
    torch.manual_seed(0)
    model = cls(llama_config())
    assert not any(isinstance(m, lm.LowRankLinear) for m in model.modules())


def test_lowrank_config_and_readers():
    model = tiny_model("llama", tie_word_embeddings=True)
    original = model.config.to_dict()
    snapshot = copy.deepcopy(original)
    ranks = {"model.layers.0.self_attn.q_proj": 8}
    cfg = export.lowrank_config(original, ranks, "svd-llm")
    assert original == snapshot  # not mutated
    assert cfg["lowrank"] == {"format_version": 1, "method": "svd-llm", "ranks": ranks}
    assert cfg["auto_map"] == {"AutoModelForCausalLM": "modeling_lowrank.LowRankForCausalLM"}
    assert cfg["architectures"] == ["LowRankForCausalLM"]
    assert cfg["tie_word_embeddings"] is True  # lm_head not factorized: tying unchanged
    assert export.is_factorized(cfg) and not export.is_factorized(original)
    assert export.ranks_of(cfg) == ranks and export.ranks_of(original) == {}
    json.dumps(cfg)  # still serialisable

    with_head = export.lowrank_config(original, {**ranks, "lm_head": 16}, "svd")
    assert with_head["tie_word_embeddings"] is False
    assert export.ranks_of(with_head) == {**ranks, "lm_head": 16}
    # other auto_map entries survive
    kept = export.lowrank_config({**original, "auto_map": {"AutoTokenizer": "x.Tok"}}, ranks, "svd")
    assert kept["auto_map"] == {"AutoTokenizer": "x.Tok", **export.AUTO_MAP}

    with pytest.raises(UsageError):
        export.lowrank_config(original, {}, "svd")
    with pytest.raises(UsageError):
        export.lowrank_config(original, {"lm_head": 0}, "svd")
    with pytest.raises(UsageError):
        export.lowrank_config({**original, "model_type": "no-such-model"}, ranks, "svd")


def test_causal_lm_class_name():
    assert export.causal_lm_class_name("llama") == "LlamaForCausalLM"
    assert export.causal_lm_class_name("gpt_bigcode") == "GPTBigCodeForCausalLM"
    assert export.causal_lm_class_name("qwen2") == "Qwen2ForCausalLM"
    assert export.causal_lm_class_name("mistral") == "MistralForCausalLM"
    with pytest.raises(UsageError):
        export.causal_lm_class_name("not-a-model")


def test_dense_weight_float32_product_in_factor_dtype():
    torch.manual_seed(0)
    up = torch.randn(16, 4).to(torch.bfloat16)
    down = torch.randn(4, 8).to(torch.bfloat16)
    w = export.dense_weight(up, down)
    assert w.dtype == torch.bfloat16 and w.shape == (16, 8)
    torch.testing.assert_close(w, (up.float() @ down.float()).to(torch.bfloat16), atol=0, rtol=0)
    layer = lm.LowRankLinear(8, 16, 4)
    torch.testing.assert_close(export.dense_weight(layer.up, layer.down), layer.up.weight @ layer.down.weight)
    with pytest.raises(ValueError):
        export.dense_weight(down, down)
