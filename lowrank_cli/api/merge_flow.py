"""The streaming part of `lowrank merge` (see `lowrank_cli.api.merge` for the checks that come first).

Base tensors are visited in checkpoint order; each is read, changed by its fold (if the adapter has one),
and handed to the ShardWriter before the next is read. With --dense a factor pair NAME.up / NAME.down is
read together (after folding each) and written as NAME.weight = up @ down (+ NAME.bias = NAME.up.bias).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from lowrank_cli.api.common import Timer
from lowrank_cli.io.manifest import write_manifest
from lowrank_cli.io.output import OutputDir
from lowrank_cli.io.verify import verify_checkpoint
from lowrank_cli.io.writer import ShardWriter, parse_size
from lowrank_cli.result import Result

__all__ = ["MergeResult", "run", "dense_config"]


@dataclass
class MergeResult(Result):
    model: str
    output: str
    adapter: str | None
    adapter_type: str | None  # lora | miss | bat | mini (several kinds: comma-separated)
    base_format: str  # dense | factorized | gptq
    output_format: str  # dense | factorized | gptq
    folded: int  # base tensors changed by the adapter
    densified: int  # factor pairs multiplied back
    params: dict
    ranks: dict  # the output's factor ranks ({} for a dense output)
    timings_s: dict = field(default_factory=dict)
    requantize: dict | None = None  # --requantize: grid, perplexity and error of the new quantization

    def summary(self):
        p = self.params
        rows = [("model", self.model), ("output", self.output)]
        if self.adapter:
            rows.append(("adapter", f"{self.adapter} ({self.adapter_type}, {self.folded} tensors folded)"))
        if self.densified:
            rows.append(("densified", f"{self.densified} factor pairs multiplied back"))
        rows += [("format", f"{self.base_format} -> {self.output_format}"),
                 ("params", f"{p['before']:,} -> {p['after']:,}")]
        if self.requantize:
            q = self.requantize
            rows.append(("requantized", f"{q['method']} {q['bits']}-bit, group {q['group_size']}; perplexity "
                                        f"{q['perplexity']['final']:.4f}"))
        rows.append(("time", f"{sum(self.timings_s.values()):.1f} s"))
        return rows


def dense_config(config: dict) -> dict:
    """config.json of the densified checkpoint: no lowrank section, no auto_map entry of ours, the native
    architecture name. tie_word_embeddings stays as it is (a factorized head was untied for good)."""
    from lowrank_cli.modeling.export import AUTO_MAP, CLASS_NAME, causal_lm_class_name

    cfg = {k: v for k, v in config.items() if k != "lowrank"}
    auto_map = {k: v for k, v in (cfg.get("auto_map") or {}).items() if AUTO_MAP.get(k) != v}
    if auto_map:
        cfg["auto_map"] = auto_map
    else:
        cfg.pop("auto_map", None)
    if cfg.get("architectures") == [CLASS_NAME]:
        cfg["architectures"] = [causal_lm_class_name(cfg.get("model_type"))]
    return cfg


def output_config(config: dict, dense: bool) -> dict:
    """config.json of a merged (full-precision) output: quantization_config dropped (a dequantized GPTQ base),
    and for a dense output, no lowrank section or remote code of ours."""
    from lowrank_cli.modeling.export import is_factorized

    cfg = {k: v for k, v in config.items() if k != "quantization_config"}
    return dense_config(cfg) if dense or not is_factorized(cfg) else cfg


def _factor_of(name: str, ranks: dict) -> tuple[str, str] | None:
    """(module, part) for NAME.up.weight / NAME.down.weight / NAME.up.bias of a factorized module."""
    for part in (".up.weight", ".down.weight", ".up.bias"):
        if name.endswith(part) and name[: -len(part)] in ranks:
            return name[: -len(part)], part
    return None


def _dtype(ckpt, name: str):
    import torch

    return ckpt.tensors[name].float_dtype or torch.float32


def run(model: str, path: Path, ckpt, adapter, folds: list, base_format: str, opts, progress):
    import torch

    from lowrank_cli.methods.merge.plan import apply_fold
    from lowrank_cli.modeling.export import ranks_of, write_modeling_file

    timer = Timer()
    compute = torch.float32
    by_target = {f.target: f for f in folds}
    ranks = ranks_of(ckpt.config)
    dense = bool(opts.dense)

    def read(name: str, dtype=None):
        """The base tensor with its fold applied, in its own dtype or `dtype` (float32 for factor products,
        so a half-precision factor is rounded once, after the product)."""
        tensor = ckpt.get(name)
        fold = by_target.get(name)
        if fold is not None:
            tensor = apply_fold(fold, tensor, adapter.tensors(fold.keys), dtype=dtype)
        return tensor if dtype is None else tensor.to(dtype)

    out = OutputDir(opts.output, overwrite=opts.overwrite, inputs=[path] + ([adapter.path] if adapter else []))
    names = ckpt.names()
    densified = 0
    with out as tmp:
        writer = ShardWriter(tmp, parse_size(opts.max_shard_size))
        task = progress.task("merge", len(names))
        with timer("merge"):
            for name in names:
                factor = _factor_of(name, ranks) if dense else None
                if factor is None:
                    writer.add(name, read(name))
                elif factor[1] == ".up.weight":
                    module = factor[0]
                    up = read(f"{module}.up.weight", compute)
                    down = read(f"{module}.down.weight", compute)
                    writer.add(f"{module}.weight", (up @ down).to(_dtype(ckpt, name)))
                    densified += 1
                elif factor[1] == ".up.bias":
                    writer.add(f"{factor[0]}.bias", read(name))
                task.advance()
        writer.close()
        task.close()

        config = output_config(ckpt.config, dense)
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        if not dense and ranks:
            write_modeling_file(tmp, ckpt.model_type)
        for side in ckpt.side_files():
            shutil.copy2(side, tmp / side.name)
        with timer("verify"):
            verify_checkpoint(tmp)
        kinds = sorted({f.kind for f in folds if f.kind != "replace"})
        params = {"before": ckpt.num_params(), "after": writer.total_params}
        result = MergeResult(
            model=model, output=str(out.target), adapter=str(adapter.path) if adapter else None,
            adapter_type=",".join(kinds) if adapter else None, base_format=base_format,
            output_format="dense" if dense or not ranks else "factorized", folded=len(folds),
            densified=densified, params=params, ranks={} if dense else ranks, timings_s=timer.seconds)
        write_manifest(tmp, command="merge", options=vars(opts),
                       input_info={"model": model, "path": str(path), "fingerprint": ckpt.fingerprint(),
                                   "adapter": str(adapter.path) if adapter else None,
                                   "adapter_config": adapter.config if adapter else None},
                       metrics={"params": params},
                       extra={"folds": [{"target": f.target, "kind": f.kind} for f in folds],
                              "densified": densified, "timings_s": timer.seconds})
        out.commit()
    return result


def run_requantize(model: str, path: Path, view, adapter, folds: list, opts, progress):
    """GPTQ base: its dequantized view merged into a full-precision folder next to OUT, then `lowrank
    quantize` with the base's bits, group size, symmetry and act-order writes OUT (the scratch folder is
    removed either way). The manifest records the merge and the quantization."""
    import dataclasses
    import os

    from lowrank_cli.api.quantize import QuantizeOptions, quantize
    from lowrank_cli.io.manifest import MANIFEST

    qc = view.base.quantization
    target = Path(opts.output).expanduser().resolve()
    work = target.parent / f".{target.name}.requantize-{os.getpid()}"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    try:
        merged = run(model, path, view, adapter, folds, "gptq",
                     dataclasses.replace(opts, output=str(work / "merged"), overwrite=False), progress)
        meta = qc.get("meta") or {}
        qopts = QuantizeOptions(
            output=opts.output, bits=int(qc.get("bits", 4)), group_size=int(qc.get("group_size", 128)),
            sym=bool(qc.get("sym", True)), act_order=bool(qc.get("desc_act", False)),
            damp=float(qc.get("damp_percent", 0.01)), method=meta.get("method", "gptq") if isinstance(meta, dict)
            else "gptq", calib=opts.calib, calib_samples=opts.calib_samples, calib_seq_len=opts.calib_seq_len,
            device=opts.device, max_shard_size=opts.max_shard_size, overwrite=opts.overwrite)
        quantized = quantize(merged.output, qopts, progress)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    merged.output, merged.output_format = quantized.output, "gptq"
    merged.requantize = {"method": quantized.method, "bits": quantized.bits, "group_size": quantized.group_size,
                         "sym": quantized.sym, "act_order": quantized.act_order,
                         "perplexity": quantized.perplexity, "error": quantized.error}
    merged.timings_s = {**{f"merge_{k}": v for k, v in merged.timings_s.items()},
                        **{f"quantize_{k}": v for k, v in quantized.timings_s.items()}}
    manifest = Path(quantized.output) / MANIFEST
    doc = json.loads(manifest.read_text())
    doc.update(command="merge", options=vars(opts), requantize={"options": doc.get("options"),
                                                                 "metrics": doc.get("metrics")},
               input={"model": model, "path": str(path), "fingerprint": view.fingerprint(),
                      "adapter": str(adapter.path) if adapter else None})
    scratch = manifest.with_name(f".{MANIFEST}.tmp")
    scratch.write_text(json.dumps(doc, indent=2, default=str) + "\n")
    os.replace(scratch, manifest)
    return merged
