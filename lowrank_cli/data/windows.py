"""Tokenize documents into one stream and cut it into fixed-length windows.

Evaluation protocol (the GPTQ/SparseGPT one): documents joined with a blank line, tokenized, cut into
non-overlapping windows of `seq_len`; the trailing partial window is dropped. Perplexity is the exponent of
the token-weighted mean NLL of every predicted token (seq_len - 1 per window).
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Sequence

from lowrank_cli.errors import UsageError

__all__ = ["token_stream", "cut_windows", "windows_from_documents", "fingerprint"]

SEPARATOR = "\n\n"


def token_stream(tokenizer, docs: Sequence[str], max_tokens: int, seed: int | None = 0):
    """A 1-D LongTensor of at most `max_tokens` tokens from `docs` in a seeded order.

    Documents are tokenized one at a time (each followed by the separator) and only until `max_tokens`
    are reached, so a huge corpus costs no more than the tokens it contributes.
    """
    import torch

    order = list(range(len(docs)))
    if seed is not None:
        random.Random(seed).shuffle(order)
    ids: list[int] = []
    for i in order:
        ids.extend(tokenizer(docs[i] + SEPARATOR, add_special_tokens=False)["input_ids"])
        if len(ids) >= max_tokens:
            break
    return torch.tensor(ids[:max_tokens], dtype=torch.long)


def cut_windows(stream, seq_len: int, max_windows: int | None = None):
    """Non-overlapping [n, seq_len] windows of a token stream (the partial tail is dropped)."""
    if seq_len < 2:
        raise UsageError(f"--seq-len must be at least 2, got {seq_len}")
    n = stream.numel() // seq_len
    if max_windows is not None:
        n = min(n, max_windows)
    if n == 0:
        raise UsageError(
            f"the data yields {stream.numel()} tokens, fewer than one window of --seq-len {seq_len}"
        )
    return stream[: n * seq_len].view(n, seq_len).clone()


def windows_from_documents(tokenizer, docs: Sequence[str], *, seq_len: int, max_tokens: int,
                           seed: int | None = 0, what: str = "data"):
    """Documents -> [n, seq_len] windows covering at most `max_tokens` tokens; one-line error if none."""
    if seq_len < 2:
        raise UsageError(f"--seq-len must be at least 2, got {seq_len}")
    if max_tokens < seq_len:
        raise UsageError(f"--max-tokens ({max_tokens}) is smaller than --seq-len ({seq_len})")
    if not docs:
        raise UsageError(f"the {what} holds no text")
    stream = token_stream(tokenizer, docs, max_tokens, seed)
    if stream.numel() == 0:
        raise UsageError(f"the {what} yields no tokens")
    return cut_windows(stream, seq_len)


def fingerprint(windows) -> str:
    """A short hash of the token ids, recorded in manifests so runs can be compared."""
    return hashlib.sha256(windows.numpy().tobytes()).hexdigest()[:16]
