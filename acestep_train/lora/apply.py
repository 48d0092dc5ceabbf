"""Adapter files onto a model: as live PEFT adapters, fused into the base weights, or into a trainable adapter.

PEFT is the one adapter runtime. :func:`load_adapters` turns each normalised file (``{path: LoraDelta(A, B, scale)}``,
see :mod:`.files`) into a PEFT LoRA adapter of its own on the DiT (``LoraConfig(r, lora_alpha=scale·r)``, with
``rank_pattern`` / ``alpha_pattern`` where modules differ), so that several files with different strengths add up in
each layer, and a trainable adapter may sit beside them. A strength is PEFT's per-layer ``scaling`` (``scale ×
strength``, the official strength slider); removing an adapter deletes it from the PEFT layers. ``fuse=True`` merges
``strength · scale · B @ A`` into the base weights instead (computed in fp32). Because loaded adapters are ordinary
module parameters, the low-VRAM offload manager streams them with the layer that holds them.

Also here: :func:`load_adapter_into_trainable` (continue training from an export), :func:`restore_adapter` (any kind,
LoRA, DoRA or LoKr, as a live adapter with its exact saved tensors, e.g. to run a DoRA export) and
:func:`match_adapter` (check a file against a model, also one on the meta device, before loading anything).
"""

from __future__ import annotations

import logging
import re
import warnings
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Union

import torch
from torch import nn

from acestep_train.lora.files import LoraFile, read_adapter_state, read_lora
from acestep_train.lora.inject import (SPECS_ATTR, LoraSpec, adapter_names, adapter_params, adapter_state_dict,
                                       apply_lora, base_linear, get_spec, inject_adapter, linear_paths, require_peft,
                                       resolve_decoder)
from acestep_train.lora.keys import LoraDelta, LoraError, LoraMatchError, modules_of
from acestep_train.lora.live import delete_adapter

log = logging.getLogger(__name__)

AdapterSource = Union[str, Path, LoraFile, Mapping[str, LoraDelta]]
LOADED_PREFIX = "loaded_"  # PEFT adapter names of loaded files: loaded_0, loaded_1, ...


def _read_source(src: AdapterSource, format: str | None = None) -> tuple[str, dict[str, LoraDelta]]:
    """``(label, weights)`` of a path, a :class:`LoraFile` or normalised weights."""
    if isinstance(src, LoraFile):
        return src.path, src.weights
    if isinstance(src, Mapping):
        return "<weights>", dict(src)
    f = read_lora(src, format)
    return f.path, f.weights


def match_adapter(decoder: nn.Module, weights: Mapping[str, LoraDelta], label: str = "adapter"
                  ) -> list[tuple[str, nn.Module, LoraDelta]]:
    """``(path, module, delta)`` for every adapter entry that names a Linear of the decoder.

    Raises :class:`LoraMatchError` when none matches or when a matched module's shape disagrees; warns with the count
    and the first unmatched keys when only some match.
    """
    decoder = resolve_decoder(decoder)
    modules = dict(decoder.named_modules())
    by_underscore = {n.replace(".", "_"): n for n in modules}
    matched, unmatched, misshaped = [], [], []
    for key, w in weights.items():
        path = key if key in modules else by_underscore.get(key)
        if path is None and key.startswith("decoder.") and key[len("decoder."):] in modules:
            path = key[len("decoder."):]
        if path is None:
            unmatched.append(key)
            continue
        module = modules[path]
        base = base_linear(module)
        if not isinstance(base, nn.Linear):
            misshaped.append(f"{key} (model has {type(base).__name__}, not Linear)")
            continue
        want_a, want_b = (w.rank, base.in_features), (base.out_features, w.rank)
        if tuple(w.A.shape) != want_a or tuple(w.B.shape) != want_b:
            misshaped.append(f"{key}: A {list(w.A.shape)} B {list(w.B.shape)} vs Linear {base.in_features}->"
                             f"{base.out_features}")
            continue
        matched.append((path, module, w))
    n = len(weights)
    if misshaped:
        raise LoraMatchError(f"{label}: {len(misshaped)} of {n} LoRA modules do not fit the model's layers "
                             f"(another model size?): {'; '.join(misshaped[:3])}")
    if not matched:
        raise LoraMatchError(
            f"{label}: 0 of {n} LoRA modules match the model (first adapter keys: {', '.join(sorted(unmatched)[:3])}; "
            f"model Linear layers e.g. {', '.join(linear_paths(decoder)[:3])})")
    if unmatched:
        warnings.warn(f"{label}: only {len(matched)} of {n} LoRA modules match the model; {len(unmatched)} unmatched "
                      f"(first: {', '.join(sorted(unmatched)[:5])})", stacklevel=3)
    return matched


# ---- two ways to apply a normalised adapter ----------------------------------------------------------------------

@torch.no_grad()
def _fuse_into_base(decoder: nn.Module, entries: Iterable[tuple[str, LoraDelta]], strength: float) -> None:
    """``W += strength · scale · B @ A`` for each ``(path, delta)``, computed in fp32 and rounded once to W's dtype
    (into ``base_layer`` when the module is a PEFT layer)."""
    if strength == 0:
        return
    for path, w in entries:
        weight = base_linear(decoder.get_submodule(path)).weight
        delta = (strength * w.scale) * (w.B.to(weight.device, torch.float32) @ w.A.to(weight.device, torch.float32))
        weight.copy_((weight.float() + delta).to(weight.dtype))


def _peft_config(entries: list[tuple[str, LoraDelta]]):
    """``LoraConfig`` for these modules: the most common (rank, scale) as ``r`` / ``lora_alpha``, the others as
    ``rank_pattern`` / ``alpha_pattern`` (keys are escaped paths: PEFT reads them as regexes on a path suffix)."""
    peft = require_peft()
    r, scale = Counter((w.rank, float(w.scale)) for _, w in entries).most_common(1)[0][0]
    rank_pattern = {re.escape(p): w.rank for p, w in entries if w.rank != r}
    alpha_pattern = {re.escape(p): w.scale * w.rank for p, w in entries if (w.rank, float(w.scale)) != (r, scale)}
    return peft.LoraConfig(r=r, lora_alpha=scale * r, lora_dropout=0.0, bias="none",
                           target_modules=[p for p, _ in entries], rank_pattern=rank_pattern,
                           alpha_pattern=alpha_pattern)


def _inject_loaded(decoder: nn.Module, adapter_name: str, entries: list[tuple[str, LoraDelta]], strength: float,
                  dtype: torch.dtype | None = None) -> None:
    """One normalised adapter as the frozen PEFT adapter ``adapter_name``: ``A``/``B`` in ``dtype`` (default: each
    layer's weight dtype) on the layer's device, ``scaling = scale × strength``."""
    inject_adapter(decoder, _peft_config(entries), adapter_name, empty=True)  # meta tensors, assigned below
    try:
        for path, w in entries:
            layer = decoder.get_submodule(path)
            if layer.r.get(adapter_name) != w.rank:  # pragma: no cover - PEFT's pattern matching
                raise LoraError(f"{path}: PEFT made rank {layer.r.get(adapter_name)} for a rank-{w.rank} adapter")
            weight = base_linear(layer).weight
            dt = dtype or weight.dtype
            layer.lora_A[adapter_name].weight = nn.Parameter(w.A.to(weight.device, dt), requires_grad=False)
            layer.lora_B[adapter_name].weight = nn.Parameter(w.B.to(weight.device, dt), requires_grad=False)
            layer.scaling[adapter_name] = w.scale * strength
    except BaseException:
        delete_adapter(decoder, adapter_name)
        raise


@dataclass(eq=False)
class LoadedAdapter:
    """One file applied by :func:`load_adapters`; ``peft_name`` is its PEFT adapter (None when fused)."""

    label: str
    strength: float
    entries: list[tuple[str, LoraDelta]]
    peft_name: str | None
    active: bool = True

    @property
    def fused(self) -> bool:
        return self.peft_name is None


class LoadedAdapters:
    """Adapters applied by :func:`load_adapters`: change strengths, remove them (also as a context manager)."""

    def __init__(self, decoder: nn.Module):
        self.decoder = decoder
        self.adapters: list[LoadedAdapter] = []

    def __len__(self) -> int:
        return sum(a.active for a in self.adapters)

    def __enter__(self) -> "LoadedAdapters":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    @property
    def labels(self) -> list[str]:
        return [a.label for a in self.adapters if a.active]

    def _find(self, which: int | str) -> LoadedAdapter:
        if isinstance(which, int):
            return self.adapters[which]
        for a in self.adapters:
            if a.label == which or Path(a.label).name == which:
                return a
        raise KeyError(f"no loaded adapter {which!r}; have {[a.label for a in self.adapters]}")

    def set_strength(self, which: int | str, strength: float) -> None:
        """New strength for one adapter (live: PEFT ``scaling``; fused: adds the difference to the weights)."""
        a = self._find(which)
        if not a.active:
            raise LoraError(f"adapter {a.label} was removed")
        if a.fused:
            _fuse_into_base(self.decoder, a.entries, float(strength) - a.strength)
        else:
            for path, w in a.entries:
                self.decoder.get_submodule(path).scaling[a.peft_name] = w.scale * float(strength)
        a.strength = float(strength)

    def remove(self, which: int | str | None = None) -> None:
        """Take adapters off: live ones are deleted from the PEFT layers (exact); fused deltas are subtracted (exact
        up to float rounding in the weights' dtype). Not while an offload manager is attached."""
        for a in [self._find(which)] if which is not None else self.adapters:
            if not a.active:
                continue
            if a.fused:
                _fuse_into_base(self.decoder, a.entries, -a.strength)
            else:
                delete_adapter(self.decoder, a.peft_name)
            a.active = False


def _free_name(decoder: nn.Module) -> str:
    taken, i = set(adapter_names(decoder)), 0
    while f"{LOADED_PREFIX}{i}" in taken:
        i += 1
    return f"{LOADED_PREFIX}{i}"


def load_adapters(
    decoder: nn.Module,
    adapters: Iterable[AdapterSource | tuple[AdapterSource, float]],
    fuse: bool = False,
    *,
    format: str | None = None,
    dtype: torch.dtype | None = None,
) -> LoadedAdapters:
    """Apply several LoRA adapters at once, each ``(path | LoraFile | weights, strength)`` (a bare path: 1.0).

    ``fuse=True`` adds ``strength · scale · B @ A`` to each base weight (computed in fp32); ``fuse=False`` keeps the
    base weights untouched and adds each file as a frozen PEFT adapter (``loaded_0``, ``loaded_1`` …; A, B in
    ``dtype``, default the layer's dtype), removable with the returned handle. ``decoder`` may be an
    ``AceStepModel``; a trainable adapter already there stays as it is (fusing goes into ``base_layer``). Every
    adapter is read and matched before anything is applied. Load and remove adapters before attaching an offload
    manager: it takes the module structure it finds.
    """
    decoder = resolve_decoder(decoder)
    plan = []
    for item in adapters:
        src, strength = item if isinstance(item, tuple) else (item, 1.0)
        label, weights = _read_source(src, format)
        entries = [(path, w) for path, _, w in match_adapter(decoder, weights, label)]
        plan.append((label, float(strength), entries))
    handle = LoadedAdapters(decoder)
    for label, strength, entries in plan:
        name = None
        if fuse:
            _fuse_into_base(decoder, entries, strength)
        else:
            name = _free_name(decoder)
            _inject_loaded(decoder, name, entries, strength, dtype)
        handle.adapters.append(LoadedAdapter(label, strength, entries, name))
        log.info("LoRA %s: %d modules, strength %g, %s", label, len(entries), strength,
                 "fused" if fuse else f"PEFT adapter {name!r}")
    return handle


def load_adapters_fused_into_base(decoder: nn.Module, adapters: Iterable[AdapterSource | tuple[AdapterSource, float]],
                                  format: str | None = None) -> LoadedAdapters:
    """Fuse adapters into the frozen base weights before training (differential LoRA): ``load_adapters(fuse=True)``.

    With a trainable PEFT adapter already injected the deltas go into each ``base_layer``; the fused base is not part
    of a checkpoint of trainable tensors, so a resumed run must fuse the same adapters again.
    """
    return load_adapters(decoder, adapters, fuse=True, format=format)


# ---- trainable and exact live adapters from files ---------------------------------------------------------------

def _init_from_state(dec: nn.Module, spec: LoraSpec, source: str | Path, adapter_name: str,
                     format: str | None) -> int:
    """DoRA / LoKr: copy the saved canonical tensors into the live adapter of the same kind and rank."""
    peft = require_peft()
    label = str(source)
    state, fspec, _ = read_adapter_state(source, format)
    if (fspec.kind, fspec.use_dora, fspec.rank) != (spec.kind, spec.use_dora, spec.rank):
        raise LoraMatchError(f"{label}: a {fspec.variant} rank-{fspec.rank} adapter cannot initialise this run's "
                             f"{spec.variant} rank-{spec.rank} adapter")
    live = adapter_state_dict(dec, adapter_name)
    extra = sorted(set(state) - set(live))
    bad = [k for k in state if k in live and state[k].shape != live[k].shape]
    if extra or bad:
        raise LoraMatchError(f"{label}: {len(extra)} saved tensors have no place in the live adapter (first "
                             f"{extra[:3]}), {len(bad)} mis-shaped (first {bad[:3]})")
    if len(state) < len(live):
        warnings.warn(f"{label}: initialises {len(state)} of {len(live)} adapter tensors; the rest keep their "
                      "initial values", stacklevel=3)
    peft.set_peft_model_state_dict(dec, dict(state), adapter_name=adapter_name)
    return len(modules_of(state))


def load_adapter_into_trainable(decoder: nn.Module, source: AdapterSource, *, adapter_name: str = "default",
                                format: str | None = None) -> int:
    """Initialise the live (trainable) adapter ``adapter_name`` from a saved adapter: continue training from an export.

    Plain LoRA from any of the four layouts: ``A`` is copied and ``B`` rescaled by ``file scale / live scale`` so that
    the delta ``scale · B @ A`` is the saved one even when alpha differs (exact when the ratio is a power of two).
    DoRA / LoKr: an ``acestep`` file or ``peft`` folder of the same kind and rank, copied tensor by tensor. Ranks must
    agree; every saved module must be adapted (live modules the file lacks keep their zero delta, with a warning).
    ``requires_grad`` is left as it is. Returns the number of modules loaded.
    """
    dec = resolve_decoder(decoder)
    spec = get_spec(dec, adapter_name)
    label = str(source) if isinstance(source, (str, Path)) else getattr(source, "path", "<weights>")
    if spec.kind != "lora" or spec.use_dora:
        if not isinstance(source, (str, Path)):
            raise LoraError(f"a {spec.variant} adapter is initialised from an 'acestep' file or a 'peft' folder")
        return _init_from_state(dec, spec, source, adapter_name, format)
    _, weights = _read_source(source, format)
    entries = match_adapter(dec, weights, label)
    unadapted = [p for p, m, _ in entries if adapter_name not in getattr(m, "lora_A", {})]
    if unadapted:
        raise LoraMatchError(f"{label}: {len(unadapted)} saved modules carry no {adapter_name!r} adapter in this run "
                             f"(targets {spec.targets!r}; first: {unadapted[:3]})")
    wrong = [f"{p} (file r={w.rank}, run r={m.r[adapter_name]})" for p, m, w in entries if w.rank != m.r[adapter_name]]
    if wrong:
        raise LoraMatchError(f"{label}: rank differs from this run's adapter: {'; '.join(wrong[:3])}")
    loaded = {p for p, _, _ in entries}
    missing = sorted(set(spec.modules) - loaded)
    if missing:
        warnings.warn(f"{label}: initialises {len(loaded)} of {len(spec.modules)} adapted modules; the other "
                      f"{len(missing)} keep a zero delta (first: {missing[:3]})", stacklevel=2)
    with torch.no_grad():
        for _, m, w in entries:
            A, B = m.lora_A[adapter_name].weight, m.lora_B[adapter_name].weight
            A.copy_(w.A.to(A.device, A.dtype))
            ratio = float(w.scale) / float(m.scaling[adapter_name])
            src = w.B.to(B.device, torch.float32) * ratio if ratio != 1.0 else w.B
            B.copy_(src.to(B.device, B.dtype))
    return len(entries)


def restore_adapter(decoder: nn.Module, path: str | Path, *, adapter_name: str = "default", trainable: bool = False,
                    format: str | None = None, adapter_dtype: torch.dtype | None = torch.float32) -> LoraSpec:
    """Inject a saved adapter (LoRA, DoRA or LoKr) as a live PEFT adapter with its saved weights, exactly.

    The way to run DoRA / LoKr exports (which have no ``(A, B, scale)`` form for :func:`load_adapters`), or to go on
    training an export as a new adapter (``trainable=True``). Every saved tensor must land in the model and every
    injected adapter tensor must come from the file.
    """
    peft = require_peft()
    state, spec, _ = read_adapter_state(path, format)
    modules = modules_of(state)
    if not modules:
        raise LoraMatchError(f"{path}: no adapter tensors found")
    dec = resolve_decoder(decoder)
    present = dict(dec.named_modules())
    missing = [p for p in modules if p not in present]
    if len(missing) == len(modules):
        raise LoraMatchError(f"{path}: 0 of {len(modules)} adapter modules match the model (first: {modules[:3]}; "
                             f"model Linear layers e.g. {', '.join(linear_paths(dec)[:3])})")
    if missing:
        raise LoraMatchError(f"{path}: {len(modules) - len(missing)} of {len(modules)} adapter modules match the "
                             f"model; a live adapter needs all (first unmatched: {missing[:5]})")
    apply_lora(decoder, rank=spec.rank, alpha=spec.alpha, dropout=spec.dropout, target_modules=modules,
               adapter_name=adapter_name, use_dora=spec.use_dora, use_rslora=spec.use_rslora, kind=spec.kind,
               adapter_dtype=adapter_dtype)
    live = adapter_state_dict(dec, adapter_name)
    if set(live) != set(state):
        extra, lack = sorted(set(state) - set(live)), sorted(set(live) - set(state))
        raise LoraMatchError(f"{path}: adapter tensors disagree with the injected adapter: {len(extra)} unexpected "
                             f"(first {extra[:3]}), {len(lack)} missing (first {lack[:3]})")
    bad = [f"{k} {list(state[k].shape)} vs {list(live[k].shape)}" for k in state if state[k].shape != live[k].shape]
    if bad:
        raise LoraMatchError(f"{path}: {len(bad)} adapter tensors do not fit the model: {'; '.join(bad[:3])}")
    result = peft.set_peft_model_state_dict(dec, dict(state), adapter_name=adapter_name)
    unexpected = list(getattr(result, "unexpected_keys", []) or [])
    if unexpected:
        raise LoraMatchError(f"{path}: PEFT did not place {len(unexpected)} tensors (first {unexpected[:3]})")
    live_spec = get_spec(dec, adapter_name)
    if spec.targets:
        live_spec.targets = spec.targets  # as trained (regex or list), not the expanded module list
    getattr(dec, SPECS_ATTR)[adapter_name] = live_spec
    for _, p in adapter_params(dec, adapter_name):
        p.requires_grad_(trainable)
    return live_spec


__all__ = ["AdapterSource", "LoadedAdapter", "LoadedAdapters", "load_adapter_into_trainable", "load_adapters",
           "load_adapters_fused_into_base", "match_adapter", "restore_adapter"]
