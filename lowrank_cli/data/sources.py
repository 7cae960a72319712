"""Where text comes from: files, globs, folders, jsonl, parquet, datasets hub ids, or the stdlib.

The default text is the running interpreter's own standard library source: real code that exists on every
machine, offline. Documents are split into disjoint parts by a stable hash, so calibration, evaluation,
test and the demo model's training text never overlap:

    bucket = sha1(key) % 10    0 -> held out    1 -> "calib"    2..9 -> "train"
    held out: sha256("test:" + key) is even -> "eval", odd -> "test"

"eval" is what a search may look at (a perplexity budget is checked on it), "test" is what is reported as
the result; the two halves of the held-out bucket are chosen by a second hash, unrelated to the first, so
each is a fair sample of it. The demo model was trained on "train" (buckets 2..9), so neither eval nor test
ever comes from there. For the stdlib the key is the file's path relative to the stdlib folder; for any
other source it is the document's text. `part=None` takes every document.

Sources: "stdlib" (code), "stdlib-prose" (its English documentation topics) and "stdlib-mix" (both, in
pairs: see `_stdlib_mix`).
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import re
import sysconfig
from pathlib import Path

from lowrank_cli.errors import UsageError

__all__ = [
    "STDLIB",
    "STDLIB_PROSE",
    "STDLIB_MIX",
    "BUILTIN_SOURCES",
    "PARTS",
    "HELD_OUT",
    "is_builtin",
    "load_documents",
    "part_of",
    "stdlib_root",
    "stdlib_files",
]

STDLIB = "stdlib"  # the stdlib's .py files: code
STDLIB_PROSE = "stdlib-prose"  # the stdlib's own documentation topics (pydoc_data): English prose
STDLIB_MIX = "stdlib-mix"  # code and prose pieces in pairs: calibration that serves both kinds of text
BUILTIN_SOURCES = (STDLIB, STDLIB_PROSE, STDLIB_MIX)
PARTS = ("eval", "test", "calib", "train")
HELD_OUT = ("eval", "test")  # bucket 0: never trained on, never calibrated on
# stdlib-mix pieces: short enough that one calibration window (512 tokens ~ 2,000 characters) holds both kinds.
MIX_PIECE_CHARS = 1500
_TEXT_SUFFIXES = {".txt", ".py", ".md", ".rst", ".json", ".c", ".h", ".js", ".ts", ".rs", ".go", ".java"}
_SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__", "idlelib", "turtledemo"}


def part_of(key: str) -> str:
    """The part ("eval", "test", "calib" or "train") a document with this key belongs to."""
    raw = key.encode("utf-8", "surrogatepass")
    bucket = int(hashlib.sha1(raw).hexdigest(), 16) % 10
    if bucket == 0:  # held out; split in two by an unrelated hash (a salted sha256, not sha1's low digits)
        return "test" if int(hashlib.sha256(b"test:" + raw).hexdigest(), 16) % 2 else "eval"
    return "calib" if bucket == 1 else "train"


def is_builtin(spec: str | None) -> bool:
    """A built-in source (None means the stdlib): always read one part of its own disjoint split."""
    return spec is None or spec in BUILTIN_SOURCES


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_files(part: str | None = None) -> list[Path]:
    """The stdlib's .py files (third-party packages excluded), sorted, optionally one part of them."""
    root = stdlib_root()
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS)
        for name in sorted(filenames):
            if name.endswith(".py"):
                path = Path(dirpath) / name
                if part is None or part_of(path.relative_to(root).as_posix()) == part:
                    found.append(path)
    return found


def _stdlib_prose(part: str | None) -> list[str]:
    try:
        from pydoc_data.topics import topics
    except ImportError as exc:  # some distributions strip pydoc_data
        raise UsageError("this Python has no pydoc_data: 'stdlib-prose' is unavailable") from exc
    return [topics[k] for k in sorted(topics) if part is None or part_of("topic:" + k) == part]


def _pieces(text: str, size: int) -> list[str]:
    """`text` cut at line ends into consecutive pieces of about `size` characters (a longer line stays whole)."""
    pieces, current, length = [], [], 0
    for line in text.splitlines(keepends=True):
        if length and length + len(line) > size:
            pieces.append("".join(current))
            current, length = [], 0
        current.append(line)
        length += len(line)
    if current:
        pieces.append("".join(current))
    return [p for p in pieces if p.strip()]


def _stdlib_mix(part: str | None) -> list[str]:
    """Documents that are each one piece of stdlib code followed by one piece of stdlib prose.

    Windows are drawn from documents in a shuffled order, so a mix of whole documents would give a small
    calibration sample (16 windows) one kind only; pairs of ~MIX_PIECE_CHARS pieces put both kinds in
    every sample, about half and half. There is far less prose than code, so the prose sets the number of
    pairs; code pieces are taken from across all files in a fixed shuffled order. For "calib" the prose
    comes from the calib and train buckets together (the calib bucket alone holds only a few thousand
    tokens of prose): calibration only has to stay disjoint from eval and test, and no model here was
    trained on the prose.
    """
    import random

    code = [p for f in stdlib_files(part) for p in _pieces(_read_text(f), MIX_PIECE_CHARS)]
    prose_parts = [part] if part != "calib" else ["calib", "train"]
    docs = [d for q in prose_parts for d in _stdlib_prose(q)] if part is not None else _stdlib_prose(None)
    prose = [p for d in docs for p in _pieces(d, MIX_PIECE_CHARS)]
    random.Random(0).shuffle(code)
    return [c + "\n\n" + p for c, p in zip(code, prose, strict=False)]  # the prose sets the count


def _read_text(path: Path) -> str:
    return path.read_text(encoding="utf-8", errors="replace")


def _documents_from_file(path: Path, text_field: str) -> list[str]:
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        docs = []
        with path.open(encoding="utf-8", errors="replace") as fh:  # as text files: never a crash
            for lineno, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise UsageError(f"{path}:{lineno}: not valid JSON ({exc.msg})") from exc
                if not isinstance(record, dict) or text_field not in record:
                    raise UsageError(f"{path}:{lineno}: no field '{text_field}' (set --text-field)")
                text = text_value(f"{path}:{lineno}", record[text_field], text_field)
                if text is not None:
                    docs.append(text)
        return docs
    if suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError as exc:
            raise UsageError("reading .parquet needs pyarrow: pip install 'lowrank-cli[data]'") from exc
        try:
            table = pq.read_table(path)
        except Exception as exc:  # pyarrow raises ArrowInvalid, OSError, ... for a damaged file
            raise UsageError(f"{path}: not a readable parquet file ({type(exc).__name__})") from exc
        if text_field not in table.column_names:
            raise UsageError(f"{path}: no column '{text_field}' (set --text-field)")
        values = table.column(text_field).to_pylist()
        texts = [text_value(f"{path} row {i}", v, text_field) for i, v in enumerate(values)]
        return [t for t in texts if t is not None]
    return [_checked_text(path)]


def text_value(where: str, value, field: str) -> str | None:
    """A record's text: a string, or None for null; anything else (a number, a list) is a UsageError rather
    than text made up with str()."""
    if value is None or isinstance(value, str):
        return value
    raise UsageError(f"{where}: '{field}' must be a string, got {type(value).__name__} {str(value)[:40]}")


# Share of characters that are not text (undecodable bytes, control characters) above which a file is
# refused: UTF-8 prose and code stay far below 1%; random bytes read as UTF-8 are mostly replacement chars.
_MAX_NON_TEXT = 0.10
_NON_TEXT = re.compile(r"[\x00-\x08\x0e-\x1f\ufffd]")


def _checked_text(path: Path) -> str:
    """A plain text file's content; a file that is mostly undecodable bytes (a binary file passed as text)
    is refused instead of being trained or calibrated on as noise."""
    text = _read_text(path)
    sample = text[:1_000_000]  # enough to tell, and bounded for huge files
    if sample:
        share = len(_NON_TEXT.findall(sample)) / len(sample)
        if share > _MAX_NON_TEXT:
            raise UsageError(f"'{path}' does not look like text: {share:.0%} of it is not UTF-8 text "
                             "(a binary file?)")
    return text


def _files_under(folder: Path) -> list[Path]:
    return sorted(
        p for p in folder.rglob("*")
        if p.is_file() and (p.suffix.lower() in _TEXT_SUFFIXES | {".jsonl", ".parquet"})
        and not any(part.startswith(".") or part in _SKIP_DIRS for part in p.relative_to(folder).parts)
    )


def hub_dataset(spec: str):
    """A datasets hub id (`name` or `name:split`, default split train) loaded, or a one-line UsageError."""
    try:
        import datasets
    except ImportError as exc:
        raise UsageError(f"'{spec}' is no file or folder; a datasets hub id needs "
                         "pip install 'lowrank-cli[data]'") from exc
    name, _, split = spec.partition(":")
    try:
        return datasets.load_dataset(name, split=split or "train")
    except Exception as exc:  # datasets raises many types: offline, unknown id, bad split
        raise UsageError(f"cannot load data '{spec}': no such file, folder or reachable dataset "
                         f"({type(exc).__name__})") from exc


def _documents_from_hub(spec: str, text_field: str) -> list[str]:
    ds = hub_dataset(spec)
    if text_field not in ds.column_names:
        raise UsageError(f"dataset '{spec}' has no column '{text_field}' (set --text-field)")
    texts = [text_value(f"{spec} row {i}", v, text_field) for i, v in enumerate(ds[text_field])]
    return [t for t in texts if t is not None]


def load_documents(spec: str | None, *, part: str | None = None, text_field: str = "text") -> list[str]:
    """Documents from a data spec, optionally restricted to one part of the disjoint split.

    Args:
        spec: None or "stdlib" (default code), "stdlib-prose", "stdlib-mix", a file (.txt/.py/... read whole,
            .jsonl with `text_field`, .parquet with column `text_field`), a glob, a folder (its text files), or a
            datasets hub id (`name` or `name:split`).
        part: "eval", "test", "calib", "train" or None for every document.
        text_field: the jsonl field / parquet column / dataset column that holds the text.
    """
    if part is not None and part not in PARTS:
        raise ValueError(f"part must be one of {PARTS}")
    if spec is None or spec == STDLIB:
        return [_read_text(p) for p in stdlib_files(part)]
    if spec == STDLIB_PROSE:
        return _stdlib_prose(part)
    if spec == STDLIB_MIX:
        return _stdlib_mix(part)
    path = Path(spec).expanduser()
    if path.is_file():
        docs = _documents_from_file(path, text_field)
    elif path.is_dir():
        files = _files_under(path)
        if not files:
            raise UsageError(f"data folder '{spec}' holds no text files")
        docs = [d for f in files for d in _documents_from_file(f, text_field)]
    elif any(ch in spec for ch in "*?["):
        files = sorted(Path(p) for p in glob.glob(os.path.expanduser(spec), recursive=True))
        files = [f for f in files if f.is_file()]
        if not files:
            raise UsageError(f"data glob '{spec}' matches no files")
        docs = [d for f in files for d in _documents_from_file(f, text_field)]
    elif spec.startswith((".", "/", "~")) or os.sep in spec and not _looks_like_hub_id(spec):
        raise UsageError(f"data path '{spec}' does not exist")
    else:
        docs = _documents_from_hub(spec, text_field)
    docs = [d for d in docs if d.strip()]
    if part is not None:
        docs = [d for d in docs if part_of(d) == part]
    return docs


def _looks_like_hub_id(spec: str) -> bool:
    return spec.count("/") == 1 and not spec.startswith("/") and " " not in spec
