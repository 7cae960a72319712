"""Check a written checkpoint against the model its config describes, before it is renamed into place.

The model is built on the meta device from the folder's own config.json (factorized checkpoints through
the same class the remote-code file defines), so this costs a skeleton and the shard headers: every
expected tensor must be present with its shape, and nothing else may be. It catches format mistakes that
transformers would only warn about at load time (and then fill with random weights).
"""

from __future__ import annotations

from pathlib import Path

from lowrank_cli.errors import RuntimeFailure

__all__ = ["verify_checkpoint"]


def verify_checkpoint(folder: Path) -> None:
    from lowrank_cli.engine.streamed import build_empty_model
    from lowrank_cli.io.checkpoint import Checkpoint
    from lowrank_cli.io.gptq_view import dequantizing

    ckpt = dequantizing(Checkpoint(folder))  # a GPTQ layer's four tensors stand for its weight
    model = build_empty_model(folder)
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    problems = []
    for name, shape in expected.items():
        info = ckpt.tensors.get(name)
        if info is None:
            if not _is_tied(model, name):
                problems.append(f"missing {name}")
        elif info.shape != shape:
            problems.append(f"{name} has shape {list(info.shape)}, the config implies {list(shape)}")
    problems += [f"unexpected {name}" for name in ckpt.tensors if name not in expected]
    if problems:
        more = f" (+{len(problems) - 3} more)" if len(problems) > 3 else ""
        raise RuntimeFailure(f"output verification failed: {'; '.join(problems[:3])}{more}")


def _is_tied(model, name: str) -> bool:
    """Tied output embeddings are stored once, under the input embedding's name."""
    if not getattr(model.config, "tie_word_embeddings", False):
        return False
    out = model.get_output_embeddings()
    return out is not None and any(name == f"{n}.weight" for n, m in model.named_modules() if m is out)
