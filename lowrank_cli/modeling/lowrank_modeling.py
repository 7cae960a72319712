"""Factorized (low-rank) linear layers for Hugging Face causal LMs: lowrank checkpoint format, version 1.

This file has two lives:

* inside lowrank_cli it is an ordinary module (lowrank_cli.modeling.lowrank_modeling) that the toolkit's own
  loader uses;
* the exporter copies its text, plus a two-line tail naming the base class, into every factorized checkpoint
  as ``modeling_lowrank.py``, so that ``AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)``
  works on a machine without lowrank_cli.

It must therefore stay self-contained: it imports torch and transformers and nothing else (no lowrank_cli,
no other third-party package, not even the standard library), and it must run on Python >= 3.10.

The format. Each factorized ``nn.Linear`` called NAME (W: out x in) is stored as two plain linears,
``NAME.down`` (in -> rank, no bias) and ``NAME.up`` (rank -> out, with the original bias if any), so that
W ~= up.weight @ down.weight. ``config.json`` carries
``"lowrank": {"format_version": 1, "method": ..., "ranks": {NAME: rank, ...}}``. Keeping both factors plain
``nn.Linear`` lets quantizers, bitsandbytes and PEFT treat them like any other linear.
"""

import torch
from torch import nn

LOWRANK_FORMAT_VERSION = 1
"""The newest checkpoint format this file can load."""

__all__ = [
    "LOWRANK_FORMAT_VERSION",
    "LowRankLinear",
    "factorize_modules",
    "lowrank_ranks",
    "make_lowrank_class",
]


class LowRankLinear(nn.Module):
    """``y = up(down(x))``: a rank-``rank`` stand-in for an ``nn.Linear(in_features, out_features)``.

    ``down`` is ``nn.Linear(in_features, rank, bias=False)`` and ``up`` is
    ``nn.Linear(rank, out_features, bias=bias)``; both are plain linears on purpose.

    ``weight`` is a read-only property that returns the dense product ``up.weight @ down.weight`` (computed in
    float32, returned in the factors' dtype). It exists only for code that reads ``.weight`` of a layer it
    expects to be a linear (for example GPTBigCode's ``_init_weights`` touches ``c_proj.weight``); it is a
    fresh tensor on every access, so writing into it never changes the factors, and it costs one matmul of
    the full dense size: do not use it on a hot path. It is None once the factors are quantized.
    """

    def __init__(self, in_features, out_features, rank, bias=True, device=None, dtype=None):
        super().__init__()
        in_features, out_features, rank = int(in_features), int(out_features), int(rank)
        if rank < 1:
            raise ValueError(f"rank must be >= 1, got {rank}")
        self.down = nn.Linear(in_features, rank, bias=False, device=device, dtype=dtype)
        self.up = nn.Linear(rank, out_features, bias=bool(bias), device=device, dtype=dtype)
        # Set only while transformers runs its weight initialisation (see _init_placeholders).
        self._weight_placeholder = None

    @property
    def rank(self):
        return self.down.out_features

    @property
    def in_features(self):
        return self.down.in_features

    @property
    def out_features(self):
        return self.up.out_features

    @property
    def weight(self):
        placeholder = self.__dict__.get("_weight_placeholder")
        if placeholder is not None:
            return placeholder
        up, down = getattr(self.up, "weight", None), getattr(self.down, "weight", None)
        if not isinstance(up, torch.Tensor) or not isinstance(down, torch.Tensor):
            # Quantized factors (GPTQ kernels keep qweight): no dense product to offer. None rather than an
            # AttributeError, because loaders walk dir(module) with getattr while converting layers.
            return None
        return (up.float() @ down.float()).to(up.dtype)

    def forward(self, x):
        return self.up(self.down(x))

    def extra_repr(self):
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
            f"bias={self.up.bias is not None}"
        )


def factorize_modules(model, ranks):
    """Replace each ``nn.Linear`` named in ``ranks`` ({module name: rank}) by a LowRankLinear of that rank.

    Names are those of ``model.named_modules()``. Only shapes are set up (the new factors get torch's default
    initialisation, or nothing at all on the meta device): the caller loads the factor weights. The new layers
    are created on the device and in the dtype of the linear they replace. A name that is already a
    LowRankLinear of the requested rank is left alone. Returns the model.
    """
    for name, rank in dict(ranks).items():
        if not isinstance(name, str) or not name:
            raise ValueError(f"bad module name in lowrank ranks: {name!r}")
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
            raise ValueError(f"rank of {name!r} must be an integer >= 1, got {rank!r}")
        parent_name, _, child_name = name.rpartition(".")
        try:
            parent = model.get_submodule(parent_name) if parent_name else model
            old = getattr(parent, child_name)
        except AttributeError as exc:
            raise ValueError(f"lowrank ranks name a module the model does not have: {name!r}") from exc
        if isinstance(old, LowRankLinear):
            if old.rank != rank:
                raise ValueError(f"{name!r} is already factorized at rank {old.rank}, not {rank}")
            continue
        if not isinstance(old, nn.Linear):
            raise ValueError(
                f"only nn.Linear modules can be factorized; {name!r} is a {type(old).__name__}"
            )
        weight = old.weight
        new = LowRankLinear(
            old.in_features,
            old.out_features,
            rank,
            bias=old.bias is not None,
            device=weight.device,
            dtype=weight.dtype,
        )
        setattr(parent, child_name, new)
    return model


def lowrank_ranks(config):
    """{module name: rank} from a config's ``lowrank`` section; {} when there is none.

    ``config`` is a transformers config object or a plain dict (config.json). Raises ValueError for a section
    written by a newer format version than this file knows.
    """
    if isinstance(config, dict):
        section = config.get("lowrank")
    else:
        section = getattr(config, "lowrank", None)
    if not section:
        return {}
    if not isinstance(section, dict):
        raise ValueError(f"config 'lowrank' must be a mapping, got {type(section).__name__}")
    version = section.get("format_version", 1)
    if not isinstance(version, int) or version > LOWRANK_FORMAT_VERSION:
        raise ValueError(
            f"this checkpoint uses lowrank format version {version!r}; this modeling code reads versions "
            f"up to {LOWRANK_FORMAT_VERSION}"
        )
    ranks = section.get("ranks") or {}
    if not isinstance(ranks, dict):
        raise ValueError("config 'lowrank.ranks' must be a mapping of module name -> rank")
    return {str(k): v for k, v in ranks.items()}


def _lowrank_module_names(model):
    return [name for name, module in model.named_modules() if isinstance(module, LowRankLinear)]


def _drop_factorized_ties(model, tied):
    """``tied`` ({target param: source param}) without the pairs that touch a factorized module."""
    names = _lowrank_module_names(model)
    if not names or not tied:
        return tied

    def touches(param_name):
        return any(param_name == n or param_name.startswith(n + ".") for n in names)

    return {t: s for t, s in tied.items() if not (touches(t) or touches(s))}


class _InitPlaceholders:
    """While active, every LowRankLinear or quantized linear in ``modules`` answers ``.weight`` with an empty
    meta tensor.

    transformers' weight initialisation may write into ``child.weight`` of a parent module (GPTBigCode's
    ``_init_weights`` does ``init.normal_(module.c_proj.weight, ...)``). With the placeholder that write is a
    no-op that neither fails, nor computes the dense product, nor touches the factors. Quantized linears
    (GPTQ kernels keep ``qweight``, no ``weight``) get the same placeholder as a plain attribute, removed
    again on exit: without it any quantized GPTBigCode checkpoint fails to load.
    """

    def __init__(self, modules):
        self.modules = modules
        self.set_here = []
        self.quantized_here = []

    def __enter__(self):
        for module in self.modules:
            if isinstance(module, LowRankLinear) and module.__dict__.get("_weight_placeholder") is None:
                dtype = getattr(module.up, "weight", None)
                module._weight_placeholder = torch.empty(
                    (module.out_features, module.in_features),
                    dtype=dtype.dtype if dtype is not None else torch.float16, device="meta",
                )
                self.set_here.append(module)
            elif _is_quantized_linear(module):
                placeholder = torch.empty(
                    (module.out_features, module.in_features), dtype=torch.float16, device="meta")
                original = type(module)
                if hasattr(original, "weight"):
                    # A class-level ``weight`` (gptqmodel's TorchLinear, picked for 2/3/8 bits, has a read-only
                    # property) cannot be shadowed by an instance attribute: swap in a subclass whose
                    # ``weight`` is the placeholder, and swap back on exit.
                    module.__class__ = _placeholder_class(original)
                    module.__dict__["_lowrank_placeholder"] = placeholder
                else:
                    object.__setattr__(module, "weight", placeholder)
                self.quantized_here.append((module, original))
        return self

    def __exit__(self, *exc):
        for module in self.set_here:
            module._weight_placeholder = None
        for module, original in self.quantized_here:
            if type(module) is not original:
                module.__class__ = original
                module.__dict__.pop("_lowrank_placeholder", None)
            else:
                object.__delattr__(module, "weight")
        self.set_here, self.quantized_here = [], []
        return False


_PLACEHOLDER_CLASSES = {}


def _placeholder_class(cls):
    """``cls`` with ``weight`` answering the placeholder set by _InitPlaceholders (one subclass per class)."""
    sub = _PLACEHOLDER_CLASSES.get(cls)
    if sub is None:
        sub = type(cls.__name__, (cls,), {
            "weight": property(lambda self: self.__dict__["_lowrank_placeholder"]),
            "__module__": cls.__module__,
        })
        _PLACEHOLDER_CLASSES[cls] = sub
    return sub


def _is_quantized_linear(module):
    return (
        "qweight" in getattr(module, "_buffers", {})
        and "weight" not in module._parameters
        and "weight" not in module.__dict__
        and hasattr(module, "in_features")
        and hasattr(module, "out_features")
    )


_LOWRANK_CLASSES = {}


def make_lowrank_class(base_cls):
    """A subclass ``LowRankForCausalLM`` of the transformers causal-LM class ``base_cls``.

    Its ``__init__(config)`` builds the base model and, if the config has a ``lowrank`` section, replaces the
    listed linears by LowRankLinear of the listed ranks (shapes only; ``from_pretrained`` then loads the
    factors). Without a ``lowrank`` section it behaves like ``base_cls``: transformers' remote-code path may
    register this class for the base config class, so ordinary checkpoints of the same architecture can come
    through it later in the same process.

    Factorized modules are dropped from the tied-weights mapping (a factorized ``lm_head`` must not be re-tied
    to the input embeddings), and weight initialisation never rewrites the factors of a loaded model. One
    class is made per base class and reused.
    """
    cached = _LOWRANK_CLASSES.get(base_cls)
    if cached is not None:
        return cached

    class LowRankForCausalLM(base_cls):
        # Called as hook(model, save_directory) after save_pretrained. transformers itself copies this file
        # into the save folder for remote-code loads; lowrank_cli sets a hook on its own copy of the class.
        _lowrank_after_save = None

        def __init__(self, config, *args, **kwargs):
            super().__init__(config, *args, **kwargs)
            ranks = lowrank_ranks(config)
            if ranks:
                factorize_modules(self, ranks)
                # post_init() ran in super().__init__ with the dense modules: recompute what depends on them.
                self.all_tied_weights_keys = _drop_factorized_ties(
                    self, dict(getattr(self, "all_tied_weights_keys", None) or {})
                )
                # Built for real (from_config, direct construction): give the new factors the model's own
                # initialisation, as post_init() did for everything else. Already-initialised modules are
                # skipped. Under from_pretrained the model is built on the meta device and this is skipped;
                # the factors are then loaded, and only missing ones are initialised.
                first = self.get_submodule(next(iter(ranks)))
                if first.down.weight.device.type != "meta":
                    self.initialize_weights()

        def get_expanded_tied_weights_keys(self, all_submodels=False):
            tied = super().get_expanded_tied_weights_keys(all_submodels=all_submodels)
            return _drop_factorized_ties(self, tied)

        def initialize_weights(self, *args, **kwargs):
            # Covers the whole tree, including nested PreTrainedModel submodules (e.g. GPTBigCodeModel), whose
            # own _init_weights is used by transformers instead of this class's.
            with _InitPlaceholders(self.modules()):
                return super().initialize_weights(*args, **kwargs)

        def save_pretrained(self, save_directory, *args, **kwargs):
            result = super().save_pretrained(save_directory, *args, **kwargs)
            hook = type(self)._lowrank_after_save
            if hook is not None and kwargs.get("is_main_process", True):
                hook(self, save_directory)
            return result

        def _init_weights(self, module):
            if isinstance(module, LowRankLinear):
                # Nothing of its own: `down` and `up` are nn.Linear children, initialised (only when missing
                # from the checkpoint) like any other linear.
                return
            with _InitPlaceholders(module.children()):
                super()._init_weights(module)

    LowRankForCausalLM.__qualname__ = "LowRankForCausalLM"
    LowRankForCausalLM.__doc__ = (
        f"{base_cls.__name__} whose linears listed in config.lowrank['ranks'] are LowRankLinear factor pairs."
    )
    _LOWRANK_CLASSES[base_cls] = LowRankForCausalLM
    return LowRankForCausalLM
