"""Controls for adapters that live in the DiT as PEFT layers: strength, merging into the base, taking them out.

These work on every PEFT adapter of the decoder, whether :func:`~.inject.apply_lora` made it for training or
:func:`~.apply.load_adapters` / :func:`~.apply.restore_adapter` loaded it from a file:

* :func:`set_adapter_strength`: the official strength slider (``scaling = alpha/r × strength``);
* :func:`merge_adapters` / :func:`unmerge_adapters`: PEFT's ``merge`` / ``unmerge`` (e.g. to run a DoRA adapter at
  base-model speed, or to save a merged checkpoint);
* :func:`delete_adapter`: take one adapter out; a layer left without adapters becomes its plain base layer again;
* :func:`remove_adapters`: take them all out (optionally merging first), restoring the released key names.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from acestep_train.lora.inject import (SPECS_ATTR, adapter_names, get_spec, is_tuner_layer, layer_adapter_names,
                                       resolve_decoder)
from acestep_train.lora.keys import LoraError


def set_adapter_strength(decoder: nn.Module, strength: float, adapter_name: str = "default") -> None:
    """Scale a live LoRA adapter's contribution (official ``set_lora_scale``: ``scaling = alpha/r × strength``)."""
    spec = get_spec(decoder, adapter_name)
    decoder = resolve_decoder(decoder)
    for m in decoder.modules():
        if is_tuner_layer(m) and adapter_name in layer_adapter_names(m):
            if not hasattr(m, "scaling"):
                raise LoraError(f"{spec.kind} adapters have no strength control here")
            m.scaling[adapter_name] = spec.scale * float(strength)


def merge_adapters(decoder: nn.Module, adapter_names: Sequence[str] | None = None, safe_merge: bool = False) -> int:
    """Fold active (or the named) adapters into the base weights (PEFT ``merge``); returns the layers merged."""
    decoder = resolve_decoder(decoder)
    n = 0
    for m in decoder.modules():
        if is_tuner_layer(m):
            m.merge(safe_merge=safe_merge, adapter_names=None if adapter_names is None else list(adapter_names))
            n += 1
    return n


def unmerge_adapters(decoder: nn.Module) -> int:
    """Undo :func:`merge_adapters` (PEFT ``unmerge``, exact up to float rounding)."""
    decoder = resolve_decoder(decoder)
    n = 0
    for m in decoder.modules():
        if is_tuner_layer(m) and m.merged:
            m.unmerge()
            n += 1
    return n


def _unwrap(decoder: nn.Module, name: str, layer: nn.Module) -> None:
    """Put the plain base layer back in place of a PEFT layer."""
    parent_name, _, child = name.rpartition(".")
    parent = decoder.get_submodule(parent_name) if parent_name else decoder
    setattr(parent, child, layer.get_base_layer())


def _forget(decoder: nn.Module, adapter_name: str | None) -> None:
    """Drop the bookkeeping of one adapter (None: all) from the decoder."""
    for attr in ("peft_config", SPECS_ATTR):
        table = getattr(decoder, attr, None)
        if table is not None and adapter_name is not None:
            table.pop(adapter_name, None)
        if table is not None and (adapter_name is None or not table):
            delattr(decoder, attr)


def delete_adapter(decoder: nn.Module, adapter_name: str) -> None:
    """Take one adapter out of every layer (unmerged); the other adapters and every ``requires_grad`` stay as they
    are. A layer left without adapters is replaced by its base layer, so that a decoder whose last adapter is
    deleted has the released module structure again."""
    decoder = resolve_decoder(decoder)
    if adapter_name not in adapter_names(decoder):
        raise LoraError(f"no adapter named {adapter_name!r} in the decoder (adapters: {adapter_names(decoder)})")
    grads = {id(p): p.requires_grad for p in decoder.parameters()}
    for name, m in [(n, m) for n, m in decoder.named_modules() if is_tuner_layer(m)]:
        if adapter_name not in layer_adapter_names(m):
            continue
        if adapter_name in getattr(m, "merged_adapters", ()):
            raise LoraError(f"adapter {adapter_name!r} is merged into {name}; unmerge it first")
        m.delete_adapter(adapter_name)  # PEFT picks the remaining adapters as active
        if not layer_adapter_names(m):
            _unwrap(decoder, name, m)
    _forget(decoder, adapter_name)
    for p in decoder.parameters():
        if id(p) in grads:
            p.requires_grad_(grads[id(p)])


def remove_adapters(decoder: nn.Module, merge: bool = False) -> nn.Module:
    """Replace every PEFT layer by its base layer (released key names again), merging active adapters first when
    ``merge``; forgets all adapters. Returns the decoder."""
    decoder = resolve_decoder(decoder)
    wrapped = [(n, m) for n, m in decoder.named_modules() if is_tuner_layer(m)]
    for name, m in wrapped:
        if merge and not m.merged:
            m.merge()
        elif not merge and m.merged:
            m.unmerge()
        _unwrap(decoder, name, m)
    _forget(decoder, None)
    return decoder


__all__ = ["delete_adapter", "merge_adapters", "remove_adapters", "set_adapter_strength", "unmerge_adapters"]
