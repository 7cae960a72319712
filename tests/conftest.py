"""Shared fixtures: tiny offline checkpoints (built from configs) with a real BPE tokenizer.

Nothing here touches the network. The tokenizer is a 512-token byte-level BPE trained in about a second on
a few stdlib files; the models are random but real architectures (Llama with GQA, GPTBigCode with MQA),
saved sharded so every reader path (index, several files) is exercised.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# transformers copies remote-code modeling files into this cache; keep the tests' copies out of ~/.cache
os.environ["HF_MODULES_CACHE"] = tempfile.mkdtemp(prefix="lowrank-test-modules-")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

VOCAB = 512


def pytest_configure(config):
    # Tiny tensors: one thread is as fast, and immune to a busy machine's OpenMP barrier stalls
    # (2 threads made some tiny matmuls 1000x slower under load).
    import torch

    torch.set_num_threads(1)


def _train_tokenizer(folder: Path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from lowrank_cli.data.sources import stdlib_files

    files = [str(p) for p in stdlib_files("train")[:40]]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train(files, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>",
                                   bos_token="<|endoftext|>", pad_token="<|endoftext|>")
    fast.save_pretrained(folder)
    return fast


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tokenizer")
    _train_tokenizer(folder)
    return folder


def make_config(kind: str, layers: int = 2, hidden: int = 64):
    from transformers import GPTBigCodeConfig, LlamaConfig, Qwen2Config

    if kind == "llama":
        return LlamaConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                           num_attention_heads=4, num_key_value_heads=2, vocab_size=VOCAB,
                           max_position_embeddings=256, bos_token_id=0, eos_token_id=0, pad_token_id=0)
    if kind == "qwen2":
        return Qwen2Config(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                           num_attention_heads=4, num_key_value_heads=2, vocab_size=VOCAB,
                           max_position_embeddings=256, tie_word_embeddings=True, bos_token_id=0,
                           eos_token_id=0)
    if kind == "gpt_bigcode":
        return GPTBigCodeConfig(n_embd=hidden, n_layer=layers, n_head=4, n_inner=4 * hidden,
                                multi_query=True, vocab_size=VOCAB, n_positions=256, bos_token_id=0,
                                eos_token_id=0, pad_token_id=0)
    raise ValueError(kind)


def build_checkpoint(folder: Path, kind: str, tokenizer_dir: Path, *, layers: int = 2, hidden: int = 64,
                     shard: str = "40KB", seed: int = 0) -> Path:
    """A random tiny model of `kind`, saved sharded with the test tokenizer."""
    import shutil

    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(make_config(kind, layers, hidden))
    model.save_pretrained(folder, max_shard_size=shard)
    for f in tokenizer_dir.iterdir():
        shutil.copy2(f, folder / f.name)
    return folder


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory, tokenizer_dir) -> Path:
    return build_checkpoint(tmp_path_factory.mktemp("llama"), "llama", tokenizer_dir)


@pytest.fixture(scope="session")
def tiny_bigcode(tmp_path_factory, tokenizer_dir) -> Path:
    return build_checkpoint(tmp_path_factory.mktemp("bigcode"), "gpt_bigcode", tokenizer_dir)


@pytest.fixture(autouse=True)
def _no_stray_files():
    """A test must not leave files in the working directory (outputs belong in tmp_path)."""
    before = set(os.listdir("."))
    yield
    stray = set(os.listdir(".")) - before
    assert not stray, f"test left files in the working directory: {sorted(stray)}"
