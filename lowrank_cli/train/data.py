"""Training examples from the data forms `lowrank finetune --data` takes, tokenized for a causal LM.

Forms (detected per record; one file may mix them):
- `{"text": ...}` (or `--text-field`): loss on every token. Plain text sources (files, globs, folders,
  `stdlib`, `stdlib-prose`; read by `lowrank_cli.data.sources`) are text records too.
- `{"prompt": ..., "completion": ...}`: loss on the completion only (labels -100 on the prompt).
- `{"messages": [{"role": ..., "content": ...}, ...]}`: rendered with the tokenizer's chat template; loss
  on the assistant turns (found by rendering each prefix of the conversation). If the template does not
  render prefixes consistently, the loss falls on everything after the last user turn instead; the
  result's `info["chat_loss"]` says which happened.
Records come from .jsonl/.json files (or globs/folders of them), .parquet files and datasets hub ids.

Lengths: a text record longer than `max_seq_len` is cut into consecutive `max_seq_len` pieces (no text is
lost); prompt/completion and chat examples are truncated at `max_seq_len` (an example left with no
completion token is dropped and counted). `packing=True` joins all examples (each ends with EOS) into one
stream cut into `max_seq_len` blocks; attention then spans example boundaries (the usual "wrapped" packing),
the masks on prompts are kept.

Held-out split (no `--eval-data`): records whose stable hash (`lowrank_cli.data.sources.part_of`) falls in
the held-out bucket (1 in 10: the "eval" and "test" parts) are held out; the built-in stdlib sources use
their own "train" and "eval" parts. The split is by record/document, before any cutting, so no text is in both.
"""

from __future__ import annotations

import glob
import json
import logging
import os
import random
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from lowrank_cli.data.sources import HELD_OUT, STDLIB, is_builtin, load_documents, part_of, text_value
from lowrank_cli.errors import UsageError

__all__ = ["TrainData", "build_datasets", "load_records", "tokenize_records", "pack", "collate_fn",
           "IGNORE"]

log = logging.getLogger("lowrank")

IGNORE = -100
_RECORD_SUFFIXES = (".jsonl", ".json", ".parquet")


@dataclass
class TrainData:
    train: list[dict]  # {"input_ids": [...], "labels": [...]}
    eval: list[dict] | None
    info: dict = field(default_factory=dict)


# ----------------------------------------------------------------------------------------------- records


def _record_files(spec: str) -> list[Path] | None:
    """The record files a spec names, or None when it is plain text (or a hub id)."""
    path = Path(spec).expanduser()
    if path.is_file():
        return [path] if path.suffix.lower() in _RECORD_SUFFIXES else None
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and not any(
            part.startswith(".") for part in p.relative_to(path).parts))
        records = [p for p in files if p.suffix.lower() in _RECORD_SUFFIXES]
        return records if records and len(records) == len([p for p in files if _is_data(p)]) else None
    if any(ch in spec for ch in "*?["):
        files = sorted(Path(p) for p in glob.glob(os.path.expanduser(spec), recursive=True))
        files = [f for f in files if f.is_file()]
        if files and all(f.suffix.lower() in _RECORD_SUFFIXES for f in files):
            return files
    return None


def _is_data(path: Path) -> bool:
    from lowrank_cli.data.sources import _TEXT_SUFFIXES

    return path.suffix.lower() in _TEXT_SUFFIXES | set(_RECORD_SUFFIXES)


def _read_file_records(path: Path) -> list[tuple[str, dict]]:
    """(where, record) pairs; `where` names the file and line for error messages."""
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        out = []
        with path.open(encoding="utf-8", errors="replace") as fh:
            for lineno, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    out.append((f"{path}:{lineno}", json.loads(line)))
                except json.JSONDecodeError as exc:
                    raise UsageError(f"{path}:{lineno}: not valid JSON ({exc.msg})") from exc
        return out
    if suffix == ".json":
        try:
            doc = json.loads(path.read_text(encoding="utf-8", errors="replace"))
        except json.JSONDecodeError as exc:
            raise UsageError(f"{path}: not valid JSON ({exc.msg})") from exc
        if isinstance(doc, dict):
            doc = [doc]
        if not isinstance(doc, list):
            raise UsageError(f"{path}: expected a JSON list of records")
        return [(f"{path}[{i}]", r) for i, r in enumerate(doc)]
    try:
        import pyarrow.parquet as pq
    except ImportError as exc:
        raise UsageError("reading .parquet needs pyarrow: pip install 'lowrank-cli[data]'") from exc
    try:
        rows = pq.read_table(path).to_pylist()
    except Exception as exc:  # pyarrow raises several types for a damaged file
        raise UsageError(f"{path}: not a readable parquet file ({type(exc).__name__})") from exc
    return [(f"{path} row {i}", r) for i, r in enumerate(rows)]


def _hub_records(spec: str) -> list[tuple[str, dict]]:
    from lowrank_cli.data.sources import hub_dataset

    ds = hub_dataset(spec)
    return [(f"{spec} row {i}", r) for i, r in enumerate(ds)]


def _kind(where: str, record, text_field: str) -> str:
    if isinstance(record, dict):
        if text_field in record:
            return "text"
        if "prompt" in record and "completion" in record:
            return "prompt_completion"
        if "messages" in record:
            return "chat"
        found = ", ".join(sorted(map(str, record))) or "none"
    else:
        found = f"a JSON {type(record).__name__}, not an object"
    raise UsageError(f"{where}: a record needs '{text_field}' (--text-field), 'prompt' and 'completion', or "
                     f"'messages'; found: {found}")


def load_records(spec: str | None, *, text_field: str = "text", part: str | None = None) -> list[dict]:
    """Records {"kind": text|prompt_completion|chat, ...} from a data spec, optionally one hash part."""
    builtin = is_builtin(spec)
    files = None if builtin else _record_files(spec)
    if files is None and not builtin:
        path = Path(spec).expanduser()
        if not path.exists() and not any(ch in spec for ch in "*?[") and spec.count("/") == 1 \
                and not spec.startswith((".", "/", "~")):
            pairs = _hub_records(spec)
            return _typed(pairs, text_field, part)
    if files is None:
        docs = load_documents(spec, part=part if builtin else None, text_field=text_field)
        records = [{"kind": "text", "text": d} for d in docs]
        if not builtin and part is not None:
            records = [r for r in records if part_of(r["text"]) == part]
        return records
    pairs = [p for f in files for p in _read_file_records(f)]
    return _typed(pairs, text_field, part)


def _typed(pairs, text_field: str, part: str | None) -> list[dict]:
    out = []
    for where, record in pairs:
        kind = _kind(where, record, text_field)
        if kind == "text":
            text = text_value(where, record[text_field], text_field)
            if text is None or not text.strip():
                continue
            item = {"kind": kind, "text": text}
        elif kind == "prompt_completion":
            item = {"kind": kind, "prompt": text_value(where, record["prompt"], "prompt") or "",
                    "completion": text_value(where, record["completion"], "completion") or ""}
            if not item["completion"]:
                continue
        else:
            msgs = record["messages"]
            if not isinstance(msgs, list) or not all(isinstance(m, dict) and "role" in m and "content" in m
                                                     for m in msgs):
                raise UsageError(f"{where}: 'messages' must be a list of {{role, content}} objects")
            if not any(m["role"] == "assistant" for m in msgs):
                raise UsageError(f"{where}: the conversation has no assistant turn to learn from")
            item = {"kind": kind, "messages": msgs}
        if part is None or part_of(_key(item)) == part:
            out.append(item)
    return out


def _key(record: dict) -> str:
    if record["kind"] == "text":
        return record["text"]
    return json.dumps({k: v for k, v in record.items() if k != "kind"}, sort_keys=True, ensure_ascii=False)


# -------------------------------------------------------------------------------------------- tokenizing


def _eos(tokenizer) -> list[int]:
    return [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []


def _text_example(tokenizer, text: str) -> tuple[list[int], list[int]]:
    ids = tokenizer(text, add_special_tokens=True)["input_ids"] + _eos(tokenizer)
    return ids, list(ids)


def _prompt_example(tokenizer, prompt: str, completion: str) -> tuple[list[int], list[int]]:
    p = tokenizer(prompt, add_special_tokens=True)["input_ids"] if prompt else []
    c = tokenizer(completion, add_special_tokens=False)["input_ids"] + _eos(tokenizer)
    return p + c, [IGNORE] * len(p) + c


def _render(tokenizer, messages, *, generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)


def _chat_spans(tokenizer, messages) -> tuple[str, list[tuple[int, int]], bool]:
    """Full text, the character spans to learn, and whether they are exactly the assistant turns."""
    full = _render(tokenizer, messages, generation_prompt=False)
    spans, exact = [], True
    for i, msg in enumerate(messages):
        if msg["role"] != "assistant":
            continue
        before = _render(tokenizer, messages[:i], generation_prompt=True) if i else ""
        upto = _render(tokenizer, messages[: i + 1], generation_prompt=False)
        if not (full.startswith(upto) and upto.startswith(before)):
            exact = False
            break
        spans.append((len(before), len(upto)))
    if not exact:  # the template renders prefixes differently: learn everything after the last user turn
        last_user = max((i for i, m in enumerate(messages) if m["role"] == "user"), default=-1)
        head = _render(tokenizer, messages[: last_user + 1], generation_prompt=True) if last_user >= 0 else ""
        if full.startswith(head):
            start = len(head)
        else:  # not even that prefix renders alike: start after the last user message's own text
            content = str(messages[last_user]["content"]) if last_user >= 0 else ""
            found = full.rfind(content) if content else -1
            start = found + len(content) if found >= 0 else 0
        spans = [(start, len(full))]
    return full, spans, exact


def _chat_example(tokenizer, messages) -> tuple[list[int], list[int], bool]:
    full, spans, exact = _chat_spans(tokenizer, messages)
    enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    ids = enc["input_ids"]
    labels = [tok if any(a <= start < b for a, b in spans) else IGNORE
              for tok, (start, _end) in zip(ids, enc["offset_mapping"], strict=True)]
    return ids, labels, exact


def tokenize_records(tokenizer, records: list[dict], *, max_seq_len: int, packing: bool = False,
                     token_budget: int | None = None) -> tuple[list[dict], dict]:
    """Records -> examples {"input_ids", "labels"}, and counts for the manifest."""
    if any(r["kind"] == "chat" for r in records) and not getattr(tokenizer, "chat_template", None):
        raise UsageError("the data holds chat 'messages' but the tokenizer has no chat template; "
                         "use 'text' or 'prompt'/'completion' records, or a chat model's tokenizer")
    examples, counts = [], Counter()
    tokens = 0
    chat_exact = True
    for rec in records:
        counts[rec["kind"]] += 1
        if rec["kind"] == "text":
            ids, labels = _text_example(tokenizer, rec["text"])
        elif rec["kind"] == "prompt_completion":
            ids, labels = _prompt_example(tokenizer, rec["prompt"], rec["completion"])
        else:
            ids, labels, exact = _chat_example(tokenizer, rec["messages"])
            chat_exact &= exact
        if packing:
            examples.append({"input_ids": ids, "labels": labels})
        elif rec["kind"] == "text":  # long text: consecutive pieces, nothing lost
            pieces = range(0, len(ids), max_seq_len)
            counts["cut"] += len(pieces) > 1
            examples += [{"input_ids": ids[i:i + max_seq_len], "labels": labels[i:i + max_seq_len]}
                         for i in pieces if len(ids[i:i + max_seq_len]) >= 2]
        else:
            if len(ids) > max_seq_len:
                counts["truncated"] += 1
                ids, labels = ids[:max_seq_len], labels[:max_seq_len]
            if all(t == IGNORE for t in labels[1:]):
                counts["dropped"] += 1  # nothing left to learn from (the prompt filled the window)
                continue
            examples.append({"input_ids": ids, "labels": labels})
        tokens += len(ids)
        if token_budget is not None and tokens >= token_budget:
            counts["stopped_at_budget"] = 1
            break
    if packing:
        examples = pack(examples, max_seq_len)
    info = {"records": dict((k, v) for k, v in counts.items() if k in ("text", "prompt_completion", "chat")),
            "examples": len(examples), "tokens": sum(len(e["input_ids"]) for e in examples),
            "cut": counts["cut"], "truncated": counts["truncated"], "dropped": counts["dropped"],
            "stopped_at_token_budget": bool(counts["stopped_at_budget"])}
    if counts["chat"]:
        info["chat_loss"] = "assistant turns" if chat_exact else "everything after the last user turn"
    return examples, info


def pack(examples: list[dict], max_seq_len: int) -> list[dict]:
    """Concatenate examples and cut the stream into max_seq_len blocks (the last one may be shorter)."""
    ids = [t for e in examples for t in e["input_ids"]]
    labels = [t for e in examples for t in e["labels"]]
    blocks = []
    for i in range(0, len(ids), max_seq_len):
        block_labels = labels[i:i + max_seq_len]
        if len(block_labels) >= 2 and any(t != IGNORE for t in block_labels[1:]):
            blocks.append({"input_ids": ids[i:i + max_seq_len], "labels": block_labels})
    return blocks


def collate_fn(pad_id: int):
    """Right-padding collate: input_ids (pad_id), attention_mask, labels (-100 on padding)."""

    def collate(examples: list[dict]):
        import torch

        length = max(len(e["input_ids"]) for e in examples)
        ids = torch.full((len(examples), length), pad_id, dtype=torch.long)
        mask = torch.zeros((len(examples), length), dtype=torch.long)
        labels = torch.full((len(examples), length), IGNORE, dtype=torch.long)
        for i, e in enumerate(examples):
            n = len(e["input_ids"])
            ids[i, :n] = torch.tensor(e["input_ids"], dtype=torch.long)
            mask[i, :n] = 1
            labels[i, :n] = torch.tensor(e["labels"], dtype=torch.long)
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}

    return collate


# ------------------------------------------------------------------------------------------------ splits


def build_datasets(tokenizer, data: str | None, eval_data: str | None = None, *, text_field: str = "text",
                   max_seq_len: int = 1024, packing: bool = False, seed: int = 0,
                   token_budget: int | None = None, max_eval_examples: int | None = 256) -> TrainData:
    """Train and held-out examples (see the module docstring). UsageError on unusable data.

    token_budget: stop tokenizing training records (in a seeded order) once this many tokens are
    collected, so a large corpus costs only what a --max-steps run can use.
    """
    if max_seq_len < 2:
        raise UsageError(f"--max-seq-len must be at least 2, got {max_seq_len}")
    what = data or STDLIB
    builtin = is_builtin(data)
    if eval_data is not None:
        train_records = load_records(data, text_field=text_field, part="train" if builtin else None)
        eval_records = load_records(eval_data, text_field=text_field,
                                    part="eval" if is_builtin(eval_data) else None)
        eval_source = eval_data
    elif builtin:
        train_records = load_records(data, text_field=text_field, part="train")
        eval_records = load_records(data, text_field=text_field, part="eval")
        eval_source = f"{what} (eval part)"
    else:
        records = load_records(data, text_field=text_field)
        train_records, eval_records = _split(records)
        eval_source = f"{what} (held-out 1 in 10 by hash)"
    if not train_records and not eval_records:
        raise UsageError(f"the training data '{what}' holds no examples")
    if not train_records:
        raise UsageError(f"the training data '{what}' leaves no examples for training")
    random.Random(seed).shuffle(train_records)
    train, train_info = tokenize_records(tokenizer, train_records, max_seq_len=max_seq_len, packing=packing,
                                         token_budget=token_budget)
    if not train:
        raise UsageError(f"the training data '{what}' yields no example with a token to learn "
                         f"(--max-seq-len {max_seq_len} too short for its prompts?)")
    evals, eval_info = None, None
    if eval_records:
        if max_eval_examples is not None:
            random.Random(seed + 1).shuffle(eval_records)
        evals, eval_info = tokenize_records(tokenizer, eval_records, max_seq_len=max_seq_len, packing=packing,
                                            token_budget=None if max_eval_examples is None
                                            else max_eval_examples * max_seq_len)
        if max_eval_examples is not None:
            evals = evals[:max_eval_examples]
        evals = evals or None
    if evals is None:
        log.warning("no held-out examples: the eval loss is not measured (give --eval-data)")
    info = {"data": what, "eval_data": eval_source if evals else None, "max_seq_len": max_seq_len,
            "packing": packing, "train": train_info,
            "eval": None if eval_info is None else {**eval_info, "examples": len(evals or [])}}
    return TrainData(train=train, eval=evals, info=info)


def _split(records: list[dict]) -> tuple[list[dict], list[dict]]:
    """Records in the hash's held-out bucket ("eval" and "test": 1 in 10) are held out; a small set with none
    there gives its lowest-hash record, so there is always something to measure when there are two or more records."""
    held = [r for r in records if part_of(_key(r)) in HELD_OUT]
    if not held and len(records) >= 2:
        import hashlib

        lowest = min(records, key=lambda r: hashlib.sha1(_key(r).encode("utf-8", "surrogatepass")).hexdigest())
        held = [lowest]
    held_ids = {id(r) for r in held}
    return [r for r in records if id(r) not in held_ids], held
