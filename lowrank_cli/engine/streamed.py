"""A causal LM whose weights stay on disk until a block needs them.

The skeleton is built on the meta device (accelerate's `init_empty_weights`), so it costs no memory. Work
then proceeds block by block:

    acts = model.capture(windows)          # embeddings only: the inputs of block 0, and each block's kwargs
    for i in range(model.num_blocks):
        block = model.load_block(i)        # this block's tensors, read from the shards
        acts = model.run_block(i, acts)    # (or a method's own work on the block)
        model.free_block(i)                # back to meta
    nll, n = model.head_nll(acts, windows) # final norm + LM head

(`run_blocks` is that loop when a block needs no work of its own.)

Decoder blocks are called exactly as the model's own forward calls them: the positional and keyword
arguments of every block (rotary embeddings, masks, position ids) are recorded once by a pass of the real
forward with each block replaced by a recorder. No per-architecture forward code is needed.
"""

from __future__ import annotations

import contextlib
import math
import sys
from dataclasses import dataclass, field

from lowrank_cli.engine.activations import Activations
from lowrank_cli.errors import UsageError
from lowrank_cli.io.checkpoint import Checkpoint

__all__ = ["StreamedModel", "build_empty_model", "find_blocks", "resolve_dtype", "release_freed_memory"]


def resolve_dtype(name: str | None, device: str = "cpu"):
    """'auto' | 'float32' | 'bfloat16' | 'float16' -> torch dtype. 'auto' is float32 on CPU (CPU half
    precision matmuls are slow and lose accuracy) and bfloat16 on accelerators."""
    import torch

    table = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
             "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}
    if name in (None, "auto"):
        return torch.float32 if str(device).startswith("cpu") else torch.bfloat16
    if name not in table:
        raise UsageError(f"unknown --dtype '{name}' (choose auto, float32, bfloat16, float16)")
    return table[name]


def _model_class(config):
    from transformers import AutoModelForCausalLM

    if getattr(config, "lowrank", None):  # a factorized checkpoint (lowrank_cli.modeling.export)
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

        from lowrank_cli.modeling.lowrank_modeling import make_lowrank_class

        return make_lowrank_class(MODEL_FOR_CAUSAL_LM_MAPPING[type(config)])
    return AutoModelForCausalLM


def build_empty_model(path):
    """The model's skeleton with every parameter on the meta device (no memory, no weights read)."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(path)
    except (ValueError, KeyError) as exc:
        raise UsageError(f"cannot read the model config in '{path}': {exc}") from exc
    cls = _model_class(config)
    with init_empty_weights():
        model = cls.from_config(config) if hasattr(cls, "from_config") else cls._from_config(config)
    # Parameters get their dtype when materialized; buffers (rotary inv_freq, masks) keep theirs.
    model.eval()
    model.config.use_cache = False
    return model


def find_blocks(model):
    """(name, ModuleList) of the decoder blocks: the ModuleList holding num_hidden_layers modules."""
    import torch.nn as nn

    n_layers = getattr(model.config, "num_hidden_layers", None)
    candidates = [(name, mod) for name, mod in model.named_modules()
                  if isinstance(mod, nn.ModuleList) and len(mod) > 0]
    exact = [c for c in candidates if len(c[1]) == n_layers]
    pool = exact or candidates
    if not pool:
        raise UsageError("the model has no list of decoder blocks this tool can stream")
    return max(pool, key=lambda c: sum(p.numel() for p in c[1].parameters()))


class _Stop(Exception):
    pass


def _stand_in(original, forward):
    """An empty module that takes a block's place in the ModuleList and answers with `forward`."""
    import torch.nn as nn

    module = nn.Module()
    # Keep the simple attributes a model's loop may read from its blocks (e.g. `attention_type`).
    for key, value in vars(original).items():
        if not key.startswith("_") and isinstance(value, (str, int, float, bool)):
            setattr(module, key, value)
    module.forward = forward
    return module


class _Recorder:
    """Stands in for block i during the capture pass: records its call, returns its input unchanged."""

    def __init__(self, index: int, original, sink: list, first: Activations | None, last: bool):
        self.module = _stand_in(original, self.forward)
        self.index, self.sink, self.first, self.last = index, sink, first, last

    def forward(self, *args, **kwargs):
        if args:
            hidden, rest = args[0], args[1:]
        else:
            hidden, rest = kwargs.pop("hidden_states"), ()
        self.sink.append((rest, kwargs))
        if self.first is not None:
            self.first.append(hidden)
        if self.last:
            raise _Stop
        return hidden


class _Injector:
    """Stands in for the blocks during the head pass: block 0 returns stored final hidden states."""

    def __init__(self, original, value=None, as_tuple: bool = False):
        self.module = _stand_in(original, self.forward)
        self.value, self.as_tuple = value, as_tuple

    def forward(self, *args, **kwargs):
        out = self.value if self.value is not None else (args[0] if args else kwargs["hidden_states"])
        return (out,) if self.as_tuple else out


@dataclass
class StreamedModel:
    """See the module docstring. `resident_bytes` tracks the parameter bytes materialized right now;
    `peak_resident_bytes` its maximum, which tests and benchmarks compare with one block's size."""

    ckpt: Checkpoint
    device: str = "cpu"
    dtype: object = None
    offload_dir: str | None = None
    model: object = field(init=False)
    resident_bytes: int = field(init=False, default=0)
    peak_resident_bytes: int = field(init=False, default=0)

    def __post_init__(self):
        import torch

        self.dtype = self.dtype or torch.float32
        self.model = build_empty_model(self.ckpt.path)
        self.blocks_name, self.blocks = find_blocks(self.model)
        self._returns_tuple = False
        outer = [n for n, _ in self.model.named_parameters() if not n.startswith(self.blocks_name + ".")]
        self._outer_names = outer

    # -- materializing -------------------------------------------------------------------------------------
    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    def block_prefix(self, i: int) -> str:
        return f"{self.blocks_name}.{i}."

    def _materialize(self, module, prefix: str) -> None:
        names = [n for n, _ in module.named_parameters(remove_duplicate=False)]
        names += [n for n, _ in module.named_buffers() if _is_persistent(module, n)]
        for local in names:
            self._load(module, local, prefix + local)

    def _load(self, module, local: str, full: str) -> int:
        """Read checkpoint tensor `full` into `module.<local>` on the device; its size in bytes."""
        from accelerate.utils import set_module_tensor_to_device

        tensor = self.ckpt.get(full) if full in self.ckpt else self._tied_source(full)
        if tensor is None:
            raise UsageError(f"checkpoint '{self.ckpt.path}' has no tensor '{full}'")
        if tensor.is_floating_point():
            tensor = tensor.to(self.dtype)
        # dtype= keeps the tensor's dtype: without it accelerate casts the value back to the
        # skeleton's (float32) dtype, silently ignoring --dtype and doubling the block's memory
        set_module_tensor_to_device(module, local, self.device, value=tensor, dtype=tensor.dtype)
        nbytes = tensor.numel() * tensor.element_size()
        self._count(nbytes)
        return nbytes

    def _tied_source(self, full: str):
        """Tied output embeddings are stored once, under the input embedding's name."""
        if not getattr(self.model.config, "tie_word_embeddings", False):
            return None
        out_emb, in_emb = self.model.get_output_embeddings(), self.model.get_input_embeddings()
        out_name = next((n for n, m in self.model.named_modules() if m is out_emb), None)
        in_name = next((n for n, m in self.model.named_modules() if m is in_emb), None)
        if out_name is not None and full == f"{out_name}.weight" and f"{in_name}.weight" in self.ckpt:
            return self.ckpt.get(f"{in_name}.weight")
        return None

    def _count(self, nbytes: int) -> None:
        self.resident_bytes += nbytes
        self.peak_resident_bytes = max(self.peak_resident_bytes, self.resident_bytes)

    def _free(self, module) -> None:
        """Parameters and persistent buffers back to meta; non-persistent buffers (computed at init, never
        stored in the checkpoint) stay, since nothing could restore them."""
        from accelerate.utils import set_module_tensor_to_device

        names = [n for n, _ in module.named_parameters()]
        names += [n for n, _ in module.named_buffers() if _is_persistent(module, n)]
        for name in names:
            tensor = module.get_parameter(name) if name in dict(module.named_parameters()) else \
                module.get_buffer(name)
            if tensor.device.type != "meta":
                self.resident_bytes -= tensor.numel() * tensor.element_size()
                set_module_tensor_to_device(module, name, "meta")
        release_freed_memory()

    def load_block(self, i: int):
        block = self.blocks[i]
        self._materialize(block, self.block_prefix(i))
        return block

    def free_block(self, i: int) -> None:
        self._free(self.blocks[i])
        # Unmap the shards too: mmap'd pages that were read count as resident memory until unmapped,
        # which would make the process's RSS grow with every block read.
        self.ckpt.close()

    @contextlib.contextmanager
    def _outer_loaded(self):
        """Embeddings, final norm and head materialized for the duration of the block."""
        from accelerate.utils import set_module_tensor_to_device

        loaded = []
        for name in self._outer_names:
            module_name, _, local = name.rpartition(".")
            module = self.model.get_submodule(module_name) if module_name else self.model
            if getattr(module, local).device.type != "meta":
                continue
            loaded.append((module, local, self._load(module, local, name)))
        try:
            yield
        finally:
            for module, local, nbytes in loaded:
                set_module_tensor_to_device(module, local, "meta")
                self.resident_bytes -= nbytes
            release_freed_memory()

    @contextlib.contextmanager
    def _blocks_replaced(self, stand_ins):
        originals = list(self.blocks)
        try:
            for i, s in enumerate(stand_ins):
                self.blocks[i] = s.module
            yield
        finally:
            for i, m in enumerate(originals):
                self.blocks[i] = m

    # -- passes -------------------------------------------------------------------------------------------
    def capture(self, windows, batch_size: int = 1) -> Activations:
        """Inputs of block 0 for every batch of `windows` ([n, seq] token ids). The returned activations
        also carry each block's call arguments (`acts.calls[i][batch]`), which `run_block` replays."""
        import torch

        first = Activations(self.offload_dir)
        sinks: list[list] = [[] for _ in range(self.num_blocks)]
        stand_ins = [_Recorder(i, b, sinks[i], first if i == 0 else None, i == self.num_blocks - 1)
                     for i, b in enumerate(self.blocks)]
        with torch.no_grad(), self._outer_loaded(), self._blocks_replaced(stand_ins):
            for start in range(0, windows.shape[0], batch_size):
                ids = windows[start:start + batch_size].to(self.device)
                try:
                    self.model(input_ids=ids, use_cache=False)
                except _Stop:
                    pass
        first.calls = sinks
        return first

    def run_block(self, i: int, acts: Activations, block=None, grad: bool = False) -> Activations:
        """Block i over every batch; the block must be materialized (or passed in, e.g. a modified copy)."""
        import torch

        block = self.blocks[i] if block is None else block
        out = acts.new_like()
        ctx = contextlib.nullcontext() if grad else torch.no_grad()
        with ctx:
            for b, hidden in enumerate(acts):
                args, kwargs = acts.calls[i][b]
                result = block(hidden, *args, **kwargs)
                if isinstance(result, tuple):
                    self._returns_tuple = True
                    result = result[0]
                out.append(result)
        return out

    def run_blocks(self, acts: Activations, progress=None) -> Activations:
        """`acts` through every block, one materialized at a time; each stream is released once the
        next exists (the final hidden states are returned)."""
        for i in range(self.num_blocks):
            self.load_block(i)
            new = self.run_block(i, acts)
            self.free_block(i)
            acts.release()
            acts = new
            if progress:
                progress(i + 1, self.num_blocks)
        return acts

    def head_logits(self, hidden, windows_batch):
        """Logits for one batch from its final hidden states (outer weights must be loaded)."""
        stand_ins = [_Injector(b, hidden if i == 0 else None, self._returns_tuple)
                     for i, b in enumerate(self.blocks)]
        with self._blocks_replaced(stand_ins):
            return self.model(input_ids=windows_batch.to(self.device), use_cache=False).logits

    def head_nll(self, acts: Activations, windows, batch_size: int = 1) -> tuple[float, int]:
        """Summed next-token NLL (float64) and the number of predicted tokens, from final hidden states."""
        rows = self.head_nll_rows(acts, windows, batch_size)
        return math.fsum(rows), int(windows[: len(rows), 1:].numel())

    def head_nll_rows(self, acts: Activations, windows, batch_size: int = 1) -> list[float]:
        """Each window's summed next-token NLL (float64), in window order, from final hidden states."""
        import torch

        from lowrank_cli.eval.perplexity import nll_rows_of_logits

        rows: list[float] = []
        with torch.no_grad(), self._outer_loaded():
            for b, hidden in enumerate(acts):
                ids = windows[b * batch_size:(b + 1) * batch_size].to(self.device)
                rows.extend(nll_rows_of_logits(self.head_logits(hidden, ids), ids))
        return rows


_MALLOC_TRIM = None


def release_freed_memory() -> None:
    """Hand freed heap memory back to the OS (glibc's malloc_trim; a no-op elsewhere).

    Weights converted to the compute dtype are anonymous allocations of a few MB each. Once one is freed,
    glibc's dynamic mmap threshold serves the next ones from the heap, where freed blocks are kept rather
    than returned: without a trim the process's resident memory grew by about a block per block."""
    global _MALLOC_TRIM
    if _MALLOC_TRIM is None:
        _MALLOC_TRIM = False
        if sys.platform.startswith("linux"):
            try:
                import ctypes

                _MALLOC_TRIM = ctypes.CDLL("libc.so.6").malloc_trim
            except (OSError, AttributeError):  # musl and other libcs have no malloc_trim
                pass
    if _MALLOC_TRIM:
        _MALLOC_TRIM(0)


def _is_persistent(module, buffer_name: str) -> bool:
    owner_name, _, local = buffer_name.rpartition(".")
    owner = module.get_submodule(owner_name) if owner_name else module
    return local not in getattr(owner, "_non_persistent_buffers_set", set())
