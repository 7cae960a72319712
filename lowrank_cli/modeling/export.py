"""Write and load factorized checkpoints (lowrank format version 1).

A factorized checkpoint is an ordinary HF checkpoint folder in which every factorized ``nn.Linear`` NAME
(weight m x n) is stored as ``NAME.down.weight`` (r x n), ``NAME.up.weight`` (m x r) and, if the original had
one, ``NAME.up.bias``; ``config.json`` carries a ``lowrank`` section (see ``lowrank_config``) and an
``auto_map`` pointing at the self-contained ``modeling_lowrank.py`` written by ``write_modeling_file``,
so that ``AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)`` loads it without lowrank_cli.
``load_model`` loads such a folder (or an ordinary one) with the toolkit's own copy of that code, without
``trust_remote_code``.

torch and transformers are imported inside the functions that need them (the CLI's ``--help`` stays fast).
"""

from __future__ import annotations

import copy
import json
import os
import tempfile
from pathlib import Path
from typing import Any

from lowrank_cli.errors import UsageError

__all__ = [
    "MODELING_FILE",
    "FORMAT_VERSION",
    "CLASS_NAME",
    "AUTO_MAP",
    "causal_lm_class_name",
    "remote_code_config",
    "NEEDS_REMOTE_CODE_WHEN_QUANTIZED",
    "quantized_needs_remote_code",
    "modeling_file_text",
    "write_modeling_file",
    "lowrank_config",
    "is_factorized",
    "ranks_of",
    "lowrank_class",
    "load_model",
    "dense_weight",
]

MODELING_FILE = "modeling_lowrank.py"
FORMAT_VERSION = 1
CLASS_NAME = "LowRankForCausalLM"
AUTO_MAP = {"AutoModelForCausalLM": f"{Path(MODELING_FILE).stem}.{CLASS_NAME}"}

_TEMPLATE = Path(__file__).with_name("lowrank_modeling.py")
_TAIL_MARK = "# --- appended by lowrank_cli.modeling.export"


def causal_lm_class_name(model_type: str) -> str:
    """Name of transformers' ``*ForCausalLM`` class for ``model_type`` ("llama" -> "LlamaForCausalLM")."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    name = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(model_type) if isinstance(model_type, str) else None
    if isinstance(name, (list, tuple)):
        name = name[0] if name else None
    if not name or not str(name).isidentifier():
        raise UsageError(
            f"model type {model_type!r} has no causal-LM class in this transformers version",
            hint="factorized checkpoints are supported for transformers' own *ForCausalLM architectures",
        )
    return str(name)


def _base_class(model_type: str):
    import transformers

    name = causal_lm_class_name(model_type)
    try:
        return getattr(transformers, name)
    except (AttributeError, ImportError) as exc:
        raise UsageError(f"transformers cannot import {name} (model type {model_type!r}): {exc}") from exc


def modeling_file_text(model_type: str) -> str:
    """The text of ``modeling_lowrank.py`` for ``model_type``: the template + a tail naming the base class."""
    name = causal_lm_class_name(model_type)
    text = _TEMPLATE.read_text(encoding="utf-8")
    if _TAIL_MARK in text:  # pragma: no cover - the template never carries a tail
        raise RuntimeError(f"{_TEMPLATE} already carries an exporter tail")
    return (
        text.rstrip("\n")
        + "\n\n\n"
        + f"{_TAIL_MARK} (format version {FORMAT_VERSION}): the base class of this checkpoint ---\n"
        + f"from transformers import {name} as _LowRankBase  # noqa: E402\n\n"
        + f"{CLASS_NAME} = make_lowrank_class(_LowRankBase)\n"
    )


def write_modeling_file(out_dir: str | os.PathLike, model_type: str) -> Path:
    """Write the self-contained ``modeling_lowrank.py`` for ``model_type`` into ``out_dir``; return its path.

    The file imports only torch and transformers. It is written atomically (temp file + rename).
    """
    text = modeling_file_text(model_type)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    target = out / MODELING_FILE
    fd, tmp = tempfile.mkstemp(prefix=".modeling_lowrank.", suffix=".tmp", dir=out)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; other users must be able to load the model
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return target


def _check_ranks(ranks: Any) -> dict[str, int]:
    if not isinstance(ranks, dict) or not ranks:
        raise UsageError("ranks must be a non-empty mapping of module name -> rank")
    out: dict[str, int] = {}
    for name, rank in ranks.items():
        if not isinstance(name, str) or not name or name.startswith(".") or name.endswith("."):
            raise UsageError(f"bad module name in ranks: {name!r}")
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
            raise UsageError(f"rank of {name!r} must be an integer >= 1, got {rank!r}")
        out[name] = rank
    return out


def _tied_targets(model_type: str) -> set[str]:
    """Parameter names the base class may tie to another parameter (normally {"lm_head.weight"})."""
    tied = getattr(_base_class(model_type), "_tied_weights_keys", None) or {}
    if isinstance(tied, dict):
        return set(tied) | set(tied.values())
    return set(tied)  # older list form


def lowrank_config(config_dict: dict, ranks: dict[str, int], method: str) -> dict:
    """A copy of ``config_dict`` (a config.json dict) marked as a factorized checkpoint; the input is kept.

    Sets ``lowrank = {"format_version": 1, "method": method, "ranks": ranks}`` (only factorized modules),
    ``auto_map["AutoModelForCausalLM"]`` (other auto_map entries are kept) and
    ``architectures = ["LowRankForCausalLM"]``.

    If a factorized module holds a tied parameter (``lm_head`` on a model with tied embeddings), sets
    ``tie_word_embeddings = False``: the head then has its own factors and must not be re-tied. The caller
    must then write the ``lm_head`` factors **and the input embedding weight**
    (e.g. ``model.embed_tokens.weight``) into the checkpoint: an ordinary tied checkpoint may store only one
    of the two, and the embedding is no longer recoverable from the head.
    """
    if not isinstance(config_dict, dict):
        raise UsageError(f"config_dict must be a dict, got {type(config_dict).__name__}")
    if not isinstance(method, str) or not method:
        raise UsageError("method must be a non-empty string")
    model_type = config_dict.get("model_type")
    causal_lm_class_name(model_type)  # the loader needs a native base class: fail now, not at load time
    ranks = _check_ranks(ranks)

    cfg = copy.deepcopy(config_dict)
    cfg["lowrank"] = {"format_version": FORMAT_VERSION, "method": method, "ranks": dict(ranks)}
    auto_map = dict(cfg.get("auto_map") or {})
    auto_map.update(AUTO_MAP)
    cfg["auto_map"] = auto_map
    cfg["architectures"] = [CLASS_NAME]

    tied = _tied_targets(model_type)
    if any(p == n or p.startswith(n + ".") for n in ranks for p in tied):
        cfg["tie_word_embeddings"] = False
    return cfg


def remote_code_config(config_dict: dict) -> dict:
    """A copy of an ordinary (not factorized) config.json dict that loads through modeling_lowrank.py.

    Used where the native class cannot load the checkpoint: transformers fails on any quantized GPTBigCode
    checkpoint (its ``_init_weights`` writes ``c_proj.weight``, which quantized linears do not have); the
    class in modeling_lowrank.py guards that write. The caller writes the modeling file.
    """
    causal_lm_class_name(config_dict.get("model_type"))
    cfg = copy.deepcopy(config_dict)
    auto_map = dict(cfg.get("auto_map") or {})
    auto_map.update(AUTO_MAP)
    cfg["auto_map"] = auto_map
    cfg["architectures"] = [CLASS_NAME]
    return cfg


# Architectures whose native class cannot load a quantized checkpoint (see remote_code_config).
NEEDS_REMOTE_CODE_WHEN_QUANTIZED = frozenset({"gpt_bigcode"})


def quantized_needs_remote_code(config_dict: dict) -> bool:
    """True if a quantized checkpoint of this config loads only through modeling_lowrank.py: factorized
    checkpoints, and architectures whose native class fails on quantized linears."""
    return is_factorized(config_dict) or config_dict.get("model_type") in NEEDS_REMOTE_CODE_WHEN_QUANTIZED


def _section(config: Any) -> Any:
    if isinstance(config, dict):
        return config.get("lowrank")
    return getattr(config, "lowrank", None)


def is_factorized(config_dict: Any) -> bool:
    """True if the config (config.json dict or transformers config) has a lowrank section with ranks."""
    section = _section(config_dict)
    return isinstance(section, dict) and bool(section.get("ranks"))


def ranks_of(config_dict: Any) -> dict[str, int]:
    """{module name: rank} of a factorized config; {} for an ordinary one."""
    if not is_factorized(config_dict):
        return {}
    return dict(_section(config_dict)["ranks"])


def _torch_dtype(dtype: Any):
    import torch

    if dtype is None or isinstance(dtype, torch.dtype) or dtype == "auto":
        return dtype
    if isinstance(dtype, str):
        value = getattr(torch, dtype.removeprefix("torch."), None)
        if isinstance(value, torch.dtype):
            return value
    raise UsageError(f"unknown dtype {dtype!r}", hint="use e.g. float32, bfloat16, float16 or auto")


def _after_save(model: Any, save_directory: str | os.PathLike) -> None:
    """save_pretrained hook of lowrank_cli's LowRankForCausalLM: complete the folder as a format-1 checkpoint.

    save_pretrained writes the factor weights and the config (with its lowrank section); this rewrites
    config.json through ``lowrank_config`` (auto_map, architectures, tie flag) and writes modeling_lowrank.py.
    """
    from lowrank_cli.modeling.lowrank_modeling import lowrank_ranks

    ranks = lowrank_ranks(model.config)
    if not ranks:
        return
    folder = Path(save_directory)
    cfg_file = folder / "config.json"
    cfg = json.loads(cfg_file.read_text(encoding="utf-8"))
    method = (cfg.get("lowrank") or {}).get("method") or "unknown"
    cfg = lowrank_config(cfg, ranks, method)
    cfg_file.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    write_modeling_file(folder, cfg["model_type"])


def lowrank_class(model_type: str):
    """lowrank_cli's ``LowRankForCausalLM`` for ``model_type`` (no remote code).

    Its ``save_pretrained`` writes a complete factorized checkpoint (config with auto_map, and
    modeling_lowrank.py), so the folder loads again with ``trust_remote_code=True``.
    """
    from lowrank_cli.modeling.lowrank_modeling import make_lowrank_class

    cls = make_lowrank_class(_base_class(model_type))
    if cls._lowrank_after_save is None:
        cls._lowrank_after_save = staticmethod(_after_save)
    return cls


def load_model(path: str | os.PathLike, *, dtype: Any = None, device: Any = "cpu", **kwargs: Any):
    """Load a checkpoint folder as a causal LM, factorized or not, without ``trust_remote_code``.

    Factorized checkpoints load through ``make_lowrank_class(<native base class>)`` from lowrank_cli's copy of
    the modeling code (the same code the folder's ``modeling_lowrank.py`` carries), ordinary ones through
    ``AutoModelForCausalLM``. ``dtype``: a torch dtype, its name, "auto", or None for transformers' default
    (in transformers 5: the checkpoint's dtype). ``device``: where to load ("cpu", "cuda:0", ...). Extra
    keyword arguments go to ``from_pretrained``. Returns the model in eval mode.

    For a factorized checkpoint, a missing factor or a leftover dense weight of a factorized module raises
    UsageError (transformers would only warn and initialise the factor at random).
    """
    folder = Path(path)
    cfg_file = folder / "config.json"
    if not cfg_file.is_file():
        raise UsageError(f"'{folder}' is not a checkpoint folder (no config.json)")
    try:
        config_dict = json.loads(cfg_file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise UsageError(f"cannot read '{cfg_file}': {exc}") from exc

    kw: dict[str, Any] = dict(kwargs)
    torch_dtype = _torch_dtype(dtype)
    if torch_dtype is not None:
        kw["dtype"] = torch_dtype
    if device is not None and str(device) != "cpu":
        kw.setdefault("device_map", {"": str(device)})

    from lowrank_cli.io.gptq_view import is_gptq

    if is_gptq(config_dict):
        return _load_gptq(folder, config_dict, kw, device=device)

    if not is_factorized(config_dict):
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(folder, **kw)
        return model.eval()

    from lowrank_cli.modeling.lowrank_modeling import lowrank_ranks

    try:
        ranks = lowrank_ranks(config_dict)
    except ValueError as exc:
        raise UsageError(f"'{folder}': {exc}", hint="upgrade lowrank_cli") from exc
    cls = lowrank_class(config_dict.get("model_type"))
    want_info = bool(kw.pop("output_loading_info", False))
    kw["output_loading_info"] = True
    model, info = cls.from_pretrained(folder, **kw)

    def owned(key: str) -> str | None:
        for name in ranks:
            if key.startswith(name + "."):
                return name
        return None

    def is_factor(key: str) -> bool:
        name = owned(key)
        return name is not None and key[len(name) + 1 :].split(".", 1)[0] in ("up", "down")

    missing = sorted(k for k in info.get("missing_keys", ()) if owned(k))
    dense = sorted(k for k in info.get("unexpected_keys", ()) if owned(k) and not is_factor(k))
    if missing or dense:
        problems = []
        if missing:
            problems.append(f"missing factors {missing[:4]}")
        if dense:
            problems.append(f"dense weights of factorized modules {dense[:4]}")
        raise UsageError(
            f"'{folder}' does not match its lowrank ranks: " + "; ".join(problems),
            hint="the checkpoint was written incompletely or config.json was edited",
        )
    return (model.eval(), info) if want_info else model.eval()


def gptq_kernels_available() -> bool:
    """True when transformers can load GPTQ checkpoints with real kernels (optimum + gptqmodel)."""
    import importlib.util

    return all(importlib.util.find_spec(m) is not None for m in ("optimum", "gptqmodel"))


def _load_gptq(folder: Path, config_dict: dict, kw: dict, *, device: Any):
    """A GPTQ checkpoint: through transformers and gptqmodel's kernels when installed, else dequantized here
    (float weights rebuilt from qweight/qzeros/scales/g_idx: slower and larger, but any machine runs it).
    Factorized and GPTBigCode checkpoints go through lowrank_cli's class (see remote_code_config)."""
    import logging

    model_type = config_dict.get("model_type")
    remote = quantized_needs_remote_code(config_dict)
    if gptq_kernels_available() and kw.pop("dequantize", False) is False:
        os.environ.setdefault("GPTQMODEL_CPU_WORKERS", str(max(2, os.cpu_count() or 1)))
        if "device_map" not in kw:
            kw["device_map"] = {"": str(device or "cpu")}
        if remote:
            model = lowrank_class(model_type).from_pretrained(folder, **kw)
        else:
            from transformers import AutoModelForCausalLM

            model = AutoModelForCausalLM.from_pretrained(folder, **kw)
        return _with_correction(model, folder).eval()

    logging.getLogger("lowrank").info("GPTQ kernels (optimum + gptqmodel) not installed: dequantizing")
    import torch

    from lowrank_cli.engine.streamed import build_empty_model
    from lowrank_cli.io.checkpoint import Checkpoint
    from lowrank_cli.io.gptq_view import DequantizedCheckpoint

    dtype = kw.get("dtype")
    dtype = dtype if isinstance(dtype, torch.dtype) else torch.float32
    model = build_empty_model(folder)
    view = DequantizedCheckpoint(Checkpoint(folder))
    state = {name: view.get(name, dtype=dtype) for name in view.tensors}
    view.close()
    result = model.load_state_dict(state, strict=False, assign=True)
    if result.unexpected_keys:
        raise UsageError(f"'{folder}' holds tensors the model does not have: {result.unexpected_keys[:3]}")
    model.tie_weights()
    left = [n for n, p in model.named_parameters() if p.device.type == "meta"]
    if left:
        raise UsageError(f"'{folder}' is missing tensors: {left[:3]}")
    return model.to(device or "cpu").eval()


def _with_correction(model: Any, folder: Path) -> Any:
    """A GPTQ model with its low-rank correction adapter (compress's gptq-lr) applied through PEFT."""
    from lowrank_cli.io.gptq_view import correction_folder

    correction = correction_folder(folder)
    if correction is None:
        return model
    from peft import PeftModel

    return PeftModel.from_pretrained(model, str(correction))


def dense_weight(up: Any, down: Any):
    """``up @ down`` computed in float32 and returned in the factors' dtype (``up``'s dtype).

    Accepts tensors or modules with a ``.weight`` (e.g. the ``up`` / ``down`` linears of a LowRankLinear).
    """
    up_w = getattr(up, "weight", up)
    down_w = getattr(down, "weight", down)
    if up_w.dim() != 2 or down_w.dim() != 2 or up_w.shape[1] != down_w.shape[0]:
        raise ValueError(f"factor shapes do not chain: up {tuple(up_w.shape)}, down {tuple(down_w.shape)}")
    return (up_w.float() @ down_w.float()).to(up_w.dtype)
