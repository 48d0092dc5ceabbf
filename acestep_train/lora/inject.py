"""Put PEFT adapters (LoRA, DoRA, LoKr) into the DiT in place, train only them, read them out.

Injection uses ``peft.inject_adapter_in_model`` and not ``get_peft_model``: the decoder stays the same
:class:`~acestep_train.models.dit.AceStepDiT` object (same ``forward`` signature, no ``PeftModel`` wrapper whose
``forward`` differs per task type), and its module paths stay the released ones. Each targeted ``nn.Linear`` becomes a
PEFT layer, so the decoder's state dict changes predictably::

    layers.0.self_attn.q_proj.weight  ->  layers.0.self_attn.q_proj.base_layer.weight
                                          layers.0.self_attn.q_proj.lora_A.<adapter>.weight   [r, in]
                                          layers.0.self_attn.q_proj.lora_B.<adapter>.weight   [out, r]

:func:`adapter_state_dict` gives the adapter alone under PEFT's canonical names (adapter name removed, relative to
the decoder: ``layers.0.self_attn.q_proj.lora_A.weight``), the names every exporter in :mod:`.files` starts from.
:func:`~.live.remove_adapters` restores the released key names (optionally merging first). PEFT is the only adapter
runtime: adapters loaded from files for inference (:mod:`.apply`) are PEFT layers as well, beside or instead of a
trainable one (:func:`inject_adapter`).

Targets follow PEFT's rules: a string is a regular expression that must match a whole module path (``re.fullmatch``;
the presets are ``model.lora_targets`` in ``conf/_model_lora_targets.yaml``), a list holds module paths or path suffixes. The
matching is done here first, so that a target set that hits nothing (or hits a non-``Linear`` module) fails with the
pattern and real module names, and PEFT then receives the explicit list of paths.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import re
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from acestep_train.lora.keys import LoraError

log = logging.getLogger(__name__)

KINDS = ("lora", "lokr")
# Attribute on the decoder that records how each adapter was made (targets as given, not PEFT's expanded list).
SPECS_ATTR = "acestep_lora_specs"


def require_peft():
    """Import PEFT or fail loudly: training "LoRA" without it would silently fine-tune nothing."""
    try:
        import peft
    except ImportError as e:  # pragma: no cover - exercised through monkeypatching in the tests
        raise ImportError(
            "LoRA/LoKr adapters need PEFT, which is not importable here "
            f"({e}). Install it with `pip install 'peft>=0.15'` (it is a dependency of acestep-train)."
        ) from None
    return peft


@dataclass
class LoraSpec:
    """How one adapter was injected; written into every export's metadata."""

    kind: str = "lora"  # lora | lokr
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: str | list[str] = ""  # as given (regex or list)
    use_dora: bool = False
    use_rslora: bool = False
    modules: list[str] = field(default_factory=list)  # module paths that received the adapter

    @property
    def scale(self) -> float:
        """The factor on ``B @ A`` in the forward pass (PEFT ``scaling``)."""
        return self.alpha / (math.sqrt(self.rank) if self.use_rslora else self.rank)

    @property
    def variant(self) -> str:
        return "dora" if self.use_dora else self.kind

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ---- the decoder and its modules ------------------------------------------------------------------------------

def resolve_decoder(module: nn.Module) -> nn.Module:
    """The DiT inside an ``AceStepModel`` / ``PeftModel`` wrapper, or the module itself."""
    if callable(getattr(module, "get_base_model", None)):  # a PeftModel
        module = module.get_base_model()
    decoder = getattr(module, "decoder", None)
    if isinstance(decoder, nn.Module) and hasattr(decoder, "layers"):
        return decoder
    return module


def is_tuner_layer(module: nn.Module) -> bool:
    try:
        from peft.tuners.tuners_utils import BaseTunerLayer
    except ImportError:
        return False
    return isinstance(module, BaseTunerLayer)


def base_linear(module: nn.Module) -> nn.Module:
    """The plain layer under PEFT wrappers (``q_proj.base_layer``), else the module."""
    while hasattr(module, "base_layer"):
        module = module.base_layer
    return module


def linear_paths(decoder: nn.Module) -> list[str]:
    """Module paths of every ``nn.Linear`` of the decoder (PEFT wrappers count as their base layer)."""
    out = []
    for name, m in decoder.named_modules():
        if name.endswith(".base_layer") or ".base_layer." in name:
            continue
        if isinstance(base_linear(m), nn.Linear) and not inside_adapter(name):
            out.append(name)
    return out


def inside_adapter(name: str) -> bool:
    return bool(re.search(r"\.(lora_[A-Za-z_]+|lokr_\w+|lora_magnitude_vector)(\.|$)", name))


def _show(targets: str | Sequence[str]) -> str:
    """A regex as written (no repr doubling of backslashes), a list as a list."""
    return f"'{targets}'" if isinstance(targets, str) else repr(list(targets))


def match_targets(decoder: nn.Module, target_modules: str | Sequence[str]) -> list[str]:
    """Module paths selected by ``target_modules`` under PEFT's rules; refuses non-Linear hits and empty results."""
    if isinstance(target_modules, str):
        try:
            pattern = re.compile(target_modules)
        except re.error as e:
            raise LoraError(f"target_modules {_show(target_modules)} is not a valid regular expression: {e}") from None

        def hit(name: str) -> bool:
            return pattern.fullmatch(name) is not None
    else:
        targets = [str(t) for t in target_modules]
        if not targets:
            raise LoraError("target_modules is an empty list")

        def hit(name: str) -> bool:
            return any(name == t or name.endswith("." + t) for t in targets)

    names = [n for n, _ in decoder.named_modules()
             if n and not n.endswith(".base_layer") and ".base_layer." not in n and not inside_adapter(n)]
    matched = [n for n in names if hit(n)]
    if not matched:
        linears = linear_paths(decoder)
        raise LoraError(
            f"target_modules {_show(target_modules)} matches no module of the {type(decoder).__name__} "
            f"({len(linears)} Linear layers, e.g. {', '.join(linears[:6])}). A string is a regular expression that "
            "must match a whole module path (PEFT rule, re.fullmatch); preset names such as 'attention' are resolved "
            "by the caller from model.lora_targets.")
    modules = dict(decoder.named_modules())
    bad = [f"{n} ({type(base_linear(modules[n])).__name__})" for n in matched
           if not isinstance(base_linear(modules[n]), nn.Linear)]
    if bad:
        raise LoraError(f"target_modules {_show(target_modules)} matches modules that are not nn.Linear: "
                        f"{', '.join(bad[:6])}{' …' if len(bad) > 6 else ''}; narrow the pattern")
    return matched


# ---- injection ---------------------------------------------------------------------------------------------------

def adapter_names(decoder: nn.Module) -> list[str]:
    """Names of the PEFT adapters present in the decoder (in injection order)."""
    return list(getattr(resolve_decoder(decoder), "peft_config", {}) or {})


def get_spec(decoder: nn.Module, adapter_name: str = "default") -> LoraSpec:
    """The :class:`LoraSpec` of an injected adapter (reconstructed from PEFT's config if we did not inject it)."""
    decoder = resolve_decoder(decoder)
    specs = getattr(decoder, SPECS_ATTR, {}) or {}
    if adapter_name in specs:
        return specs[adapter_name]
    cfg = (getattr(decoder, "peft_config", {}) or {}).get(adapter_name)
    if cfg is None:
        raise LoraError(f"no adapter named {adapter_name!r} in the decoder (adapters: {adapter_names(decoder)})")
    modules = sorted(n for n, m in decoder.named_modules()
                     if is_tuner_layer(m) and adapter_name in layer_adapter_names(m))
    peft_type = str(getattr(cfg.peft_type, "value", cfg.peft_type)).upper()
    if peft_type == "LORA":
        return LoraSpec("lora", int(cfg.r), float(cfg.lora_alpha), float(cfg.lora_dropout),
                        _targets_of(cfg), bool(cfg.use_dora), bool(cfg.use_rslora), modules)
    if peft_type == "LOKR":
        return LoraSpec("lokr", int(cfg.r), float(cfg.alpha), float(cfg.rank_dropout), _targets_of(cfg),
                        False, False, modules)
    raise LoraError(f"adapter {adapter_name!r} is {peft_type}; only LoRA/DoRA/LoKr are supported")


def _targets_of(cfg) -> str | list[str]:
    t = cfg.target_modules
    return t if isinstance(t, str) else sorted(t)


def layer_adapter_names(layer: nn.Module) -> set[str]:
    names: set[str] = set()
    for attr in getattr(layer, "adapter_layer_names", ()):
        d = getattr(layer, attr, None)
        if hasattr(d, "keys"):
            names.update(d.keys())
    return names


def adapter_params(decoder: nn.Module, adapter_name: str) -> list[tuple[str, nn.Parameter]]:
    """Parameters of one adapter (``….lora_A.<name>.weight``, ``….lokr_w1.<name>``, DoRA magnitudes)."""
    pat = re.compile(rf"\.(lora_[A-Za-z_]+|lokr_\w+)\.{re.escape(adapter_name)}(\.|$)")
    return [(n, p) for n, p in decoder.named_parameters() if pat.search(n)]


def apply_lora(
    decoder: nn.Module,
    *,
    rank: int,
    alpha: float,
    dropout: float = 0.0,
    target_modules: str | Sequence[str],
    adapter_name: str = "default",
    use_dora: bool = False,
    use_rslora: bool = False,
    kind: str = "lora",
    adapter_dtype: torch.dtype | None = torch.float32,
) -> list[str]:
    """Inject one adapter into the DiT in place and freeze everything else; returns the adapted module paths.

    ``decoder`` may also be an ``AceStepModel`` (its ``.decoder`` is adapted and the whole model frozen).
    ``kind="lokr"`` uses PEFT's ``LoKrConfig(r=rank, alpha=alpha, rank_dropout=dropout)``. Adapter weights are kept in
    ``adapter_dtype`` (fp32 by default, also on a bf16 base; PEFT casts the input to it); ``None`` keeps the base
    layer's dtype. Every adapter present stays active (their outputs add up); only the new one is trainable.
    """
    peft = require_peft()
    if kind not in KINDS:
        raise LoraError(f"kind={kind!r}; choose one of {KINDS}")
    if use_dora and kind != "lora":
        raise LoraError("use_dora applies to kind='lora' only")
    if int(rank) <= 0:
        raise LoraError(f"rank must be positive, got {rank}")
    root = decoder
    decoder = resolve_decoder(decoder)
    if adapter_name in adapter_names(decoder):
        raise LoraError(f"the decoder already has an adapter named {adapter_name!r}; pick another adapter_name")
    modules = match_targets(decoder, target_modules)
    if kind == "lora":
        config = peft.LoraConfig(r=int(rank), lora_alpha=alpha, lora_dropout=float(dropout), target_modules=modules,
                                 bias="none", use_dora=bool(use_dora), use_rslora=bool(use_rslora))
    else:
        if use_rslora:
            raise LoraError("use_rslora applies to kind='lora' only")
        config = peft.LoKrConfig(r=int(rank), alpha=alpha, rank_dropout=float(dropout), target_modules=modules)
    inject_adapter(decoder, config, adapter_name)
    spec = LoraSpec(kind, int(rank), float(alpha), float(dropout),
                    target_modules if isinstance(target_modules, str) else list(target_modules),
                    bool(use_dora), bool(use_rslora), modules)
    getattr(decoder, SPECS_ATTR)[adapter_name] = spec
    params = adapter_params(decoder, adapter_name)
    if adapter_dtype is not None:
        for _, p in params:
            if p.is_floating_point() and p.dtype != adapter_dtype:
                p.data = p.data.to(adapter_dtype)
    for p in root.parameters():
        p.requires_grad_(False)
    for _, p in params:
        p.requires_grad_(True)
    if not params:  # pragma: no cover - PEFT contract
        raise LoraError(f"PEFT injected no parameters for adapter {adapter_name!r}")
    log.info("%s adapter %r: rank %d, alpha %g on %d modules (%s)", spec.variant, adapter_name, rank, alpha,
             len(modules), target_modules)
    return modules


def inject_adapter(decoder: nn.Module, config, adapter_name: str, *, empty: bool = False) -> None:
    """``peft.inject_adapter_in_model`` under a new name, with every adapter present staying active.

    ``requires_grad`` of the parameters already there is kept (PEFT would freeze them); the new adapter's parameters
    are left as PEFT made them (trainable). ``empty=True`` creates them on the meta device (no initialisation, no
    random numbers drawn): the caller assigns their values.
    """
    peft = require_peft()
    decoder = resolve_decoder(decoder)
    if adapter_name in adapter_names(decoder):
        raise LoraError(f"the decoder already has an adapter named {adapter_name!r}; pick another adapter_name")
    previous = adapter_names(decoder)
    grads = {id(p): p.requires_grad for p in decoder.parameters()}
    with warnings.catch_warnings():
        # "Already found a peft_config attribute": expected when a second adapter is injected.
        warnings.filterwarnings("ignore", message="Already found a `peft_config`")
        peft.inject_adapter_in_model(config, decoder, adapter_name=adapter_name, low_cpu_mem_usage=empty)
    if not hasattr(decoder, SPECS_ATTR):
        setattr(decoder, SPECS_ATTR, {})
    set_active_adapters(decoder, previous + [adapter_name])
    for p in decoder.parameters():
        if id(p) in grads:
            p.requires_grad_(grads[id(p)])


def set_active_adapters(decoder: nn.Module, names: str | Iterable[str]) -> None:
    """Make exactly ``names`` active in every PEFT layer (their contributions add up); does not change
    ``requires_grad``."""
    decoder = resolve_decoder(decoder)
    names = [names] if isinstance(names, str) else list(names)
    unknown = sorted(set(names) - set(adapter_names(decoder)))
    if unknown:
        raise LoraError(f"unknown adapters {unknown}; the decoder has {adapter_names(decoder)}")
    grads = {id(p): p.requires_grad for p in decoder.parameters()}
    for m in decoder.modules():
        if is_tuner_layer(m):
            m.set_adapter(names)
    for p in decoder.parameters():
        p.requires_grad_(grads[id(p)])


# ---- reading out -------------------------------------------------------------------------------------------------

def adapter_state_dict(decoder: nn.Module, adapter_name: str = "default") -> dict[str, torch.Tensor]:
    """Only this adapter's tensors, under PEFT's canonical names relative to the decoder, detached copies:
    ``layers.0.self_attn.q_proj.lora_A.weight`` ``[r, in]``, ``….lora_B.weight`` ``[out, r]``, DoRA
    ``….lora_magnitude_vector`` ``[out]``, LoKr ``….lokr_w1`` / ``….lokr_w2`` (or ``lokr_w2_a``/``lokr_w2_b``)."""
    peft = require_peft()
    decoder = resolve_decoder(decoder)
    if adapter_name not in adapter_names(decoder):
        raise LoraError(f"no adapter named {adapter_name!r} in the decoder (adapters: {adapter_names(decoder)})")
    sd = peft.get_peft_model_state_dict(decoder, adapter_name=adapter_name, save_embedding_layers=False)
    return {k: v.detach().clone().contiguous() for k, v in sd.items()}


@dataclass
class TrainableReport:
    total: int
    trainable: int
    adapter: int  # trainable parameters that belong to an adapter
    frozen_adapter: int
    other_trainable: list[str]  # trainable parameters that are not adapter weights (should be empty in LoRA mode)

    @property
    def percent(self) -> float:
        return 100.0 * self.trainable / max(1, self.total)

    def __str__(self) -> str:
        s = f"trainable params: {self.trainable:,} of {self.total:,} ({self.percent:.2f}%); adapter {self.adapter:,}"
        if self.other_trainable:
            s += f"; {len(self.other_trainable)} non-adapter trainable tensors (first: {self.other_trainable[0]})"
        return s


def trainable_report(module: nn.Module) -> TrainableReport:
    """Count trainable vs total parameters, and flag trainable tensors that are not adapter weights."""
    total = trainable = adapter = frozen_adapter = 0
    other = []
    for name, p in module.named_parameters():
        n = p.numel()
        total += n
        is_adapter = inside_adapter(name)
        if p.requires_grad:
            trainable += n
            if is_adapter:
                adapter += n
            else:
                other.append(name)
        elif is_adapter:
            frozen_adapter += n
    return TrainableReport(total, trainable, adapter, frozen_adapter, other)


__all__ = ["KINDS", "SPECS_ATTR", "LoraError", "LoraSpec", "TrainableReport", "adapter_names", "adapter_params",
           "adapter_state_dict", "apply_lora", "base_linear", "get_spec", "inject_adapter", "inside_adapter",
           "is_tuner_layer", "layer_adapter_names", "linear_paths", "match_targets", "require_peft", "resolve_decoder",
           "set_active_adapters", "trainable_report"]
