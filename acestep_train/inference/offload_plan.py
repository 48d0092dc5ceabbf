"""What the low-VRAM offload manager (:mod:`.offload`) moves: the bundle's tensors grouped into blocks per component.

Built once per attachment, before any hook is installed: every parameter and buffer of the model, the VAE and the
text encoder becomes one :class:`Managed` record (or an anchor), every streaming unit one :class:`Block`, and each
component gets its *reserve*, the most it ever needs on the device at once. The rules (components, blocks, anchors,
pins) are described in :mod:`.offload`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

COMPONENTS = ("text_encoder", "condition_encoder", "dit", "vae")


class OffloadError(ValueError):
    """An offload configuration that cannot work (limit below the smallest working set, bad device)."""


@dataclass(eq=False)
class Managed:
    """One parameter or buffer under management."""

    module: nn.Module
    name: str
    param: nn.Parameter | None  # None for a buffer
    storage: torch.Tensor  # its data on the storage device
    nbytes: int
    component: str
    refs: int = 0
    resident: bool = False  # kept on the compute device after release ("preparing")
    anchor: bool = False
    on_compute: bool = False

    def set(self, data: torch.Tensor) -> None:
        if self.param is not None:
            self.param.data = data
        else:
            self.module._buffers[self.name] = data

    def get(self) -> torch.Tensor:
        return self.param.data if self.param is not None else self.module._buffers[self.name]


@dataclass(eq=False)
class Block:
    """The tensors that move together, brought in by a forward pre-hook on ``module``."""

    name: str
    component: str
    module: nn.Module
    tensors: list[Managed]
    nbytes: int
    chain_bytes: int = 0  # this block plus the blocks that enclose it (held at the same time)
    unit: bool = False
    uses: int = 0
    streamed: int = 0  # times its tensors had to be moved in


@dataclass
class ComponentSpec:
    roots: list[nn.Module]
    entries: list[tuple[Any, str]] = field(default_factory=list)
    pins: list[nn.Module] = field(default_factory=list)
    anchors: list[torch.Tensor] = field(default_factory=list)


def bundle_components(bundle) -> dict[str, ComponentSpec]:
    """What the sampler touches, per component (see :mod:`.offload`)."""
    m, te, vae = bundle.model, bundle.text_encoder, bundle.vae
    return {
        "text_encoder": ComponentSpec([te], [(te, "encode_captions"), (te, "embed_lyrics")],
                                      pins=[te.model.embed_tokens]),
        "condition_encoder": ComponentSpec(
            [m.encoder, m.tokenizer, m.detokenizer],
            [(m, "encode_conditions"), (m, "latents_to_hints"), (m, "codes_to_hints"), (m.tokenizer, "tokenize"),
             (m.tokenizer, "indices_to_quantized")],
            anchors=list(m.tokenizer.quantizer.parameters()) + list(m.tokenizer.quantizer.buffers())),
        "dit": ComponentSpec([m.decoder], [(m.decoder, "cross_kv")]),
        "vae": ComponentSpec([vae], [(vae, "encode"), (vae, "decode")], anchors=[next(vae.parameters())]),
    }


def direct_tensors(module: nn.Module) -> list[tuple[nn.Module, str, nn.Parameter | None]]:
    """Parameters and buffers of the module itself (plus those of its ``parametrizations``, read on access)."""
    out = [(module, n, p) for n, p in module._parameters.items() if p is not None]
    out += [(module, n, None) for n, b in module._buffers.items() if b is not None]
    par = getattr(module, "parametrizations", None)
    if isinstance(par, nn.Module):
        for sub in par.modules():
            out += [(sub, n, p) for n, p in sub._parameters.items() if p is not None]
            out += [(sub, n, None) for n, b in sub._buffers.items() if b is not None]
    return out


def weight_norms(module: nn.Module) -> list[Any]:
    """The legacy weight-norm pre-hooks of a module (they recompute ``weight`` on every forward)."""
    from torch.nn.utils.weight_norm import WeightNorm

    return [h for h in module._forward_pre_hooks.values() if isinstance(h, WeightNorm)]


def drop_weight_norm(module: nn.Module) -> None:
    """Legacy weight norm keeps the computed ``weight`` as a plain attribute: swap it for a meta placeholder so it
    does not hold device memory between forwards (its pre-hook recomputes it on every forward)."""
    for wn in weight_norms(module):
        w = getattr(module, wn.name, None)
        if isinstance(w, torch.Tensor) and w.device.type != "meta":
            setattr(module, wn.name, torch.empty_like(w, device="meta"))


def _key(module: nn.Module, name: str, param: nn.Parameter | None):
    return id(param) if param is not None else (id(module), name)


class BlockPlan:
    """The blocks, managed tensors, pins and reserves of a bundle (tensors are registered, nothing is moved)."""

    def __init__(self, bundle):
        self.specs = bundle_components(bundle)
        self.tensors: dict[Any, Managed] = {}
        self.blocks: list[Block] = []  # in build order
        self.pin_blocks: dict[str, list[Block]] = {}
        self.reserve: dict[str, int] = {}
        self.weight_norm_modules: list[nn.Module] = []
        model = bundle.model
        anchors = {id(p) for p in (next(model.parameters()), model.null_condition_emb)}
        for spec in self.specs.values():
            anchors.update(id(t) for t in spec.anchors)
        for comp, spec in self.specs.items():
            for root in spec.roots:
                self._build(comp, root, type(root).__name__, None, [], anchors, False)
        for name, p in model.named_parameters():  # the model's own (null_condition_emb): anchors
            if id(p) not in self.tensors:
                if id(p) not in anchors:
                    raise OffloadError(f"parameter {name} belongs to none of {COMPONENTS}: offload.py does not "
                                       "know when it is used")
                self._register(model, name.rsplit(".", 1)[-1], p, "dit", anchor=True)
        for m in (model, bundle.vae, bundle.text_encoder):
            for name, b in m.named_buffers():
                if not any(t.param is None and t.get() is b for t in self.tensors.values()):
                    raise OffloadError(f"buffer {name} belongs to no managed module")
        self._plan_reserve()

    def _register(self, module, name, param, component, anchor=False) -> Managed:
        key = _key(module, name, param)
        t = self.tensors.get(key)
        if t is None:
            data = param.data if param is not None else module._buffers[name]
            t = Managed(module, name, param, data, data.numel() * data.element_size(), component, anchor=anchor)
            self.tensors[key] = t
        return t

    def _new_block(self, name, comp, module, anchors, holders, unit) -> Block | None:
        if unit:
            items, seen = [], set()
            for sub in module.modules():
                for m, n, p in direct_tensors(sub):
                    if _key(m, n, p) not in seen:
                        seen.add(_key(m, n, p))
                        items.append((m, n, p))
        else:
            items = direct_tensors(module)
        tensors = [t for t in (self._register(m, n, p, comp, anchor=p is not None and id(p) in anchors)
                               for m, n, p in items) if not t.anchor]
        if not tensors:
            return None
        block = Block(name, comp, module, tensors, sum(t.nbytes for t in tensors), unit=unit)
        block.chain_bytes = block.nbytes + sum(h.nbytes for h in holders)
        self.blocks.append(block)
        return block

    def _build(self, comp: str, module: nn.Module, name: str, unit: Block | None, holders: list[Block],
               anchors: set[int], list_item: bool) -> None:
        params = list(module.parameters())
        if params and all(id(p) in anchors for p in params):  # an anchored module (FSQ quantiser): no hooks
            for m in module.modules():
                for mm, n, p in direct_tensors(m):
                    self._register(mm, n, p, comp).anchor = True
            return
        if weight_norms(module):
            self.weight_norm_modules.append(module)
        children = [(n, c) for n, c in module.named_children() if n != "parametrizations"]
        if unit is None and list_item:  # a layer of a ModuleList: one block with everything inside
            block = self._new_block(name, comp, module, anchors, holders, unit=True)
            for n, c in children:
                self._build(comp, c, f"{name}.{n}", block, holders, anchors, False)
            return
        block = self._new_block(name, comp, module, anchors, holders, unit=False)
        inner = holders + [block] if block is not None and unit is None and children else holders
        for n, c in children:
            self._build(comp, c, f"{name}.{n}", unit, inner, anchors, isinstance(module, nn.ModuleList))

    def _plan_reserve(self) -> None:
        for comp, spec in self.specs.items():
            pins = {id(m) for m in spec.pins}
            pin_blocks = [b for b in self.blocks if b.component == comp and id(b.module) in pins]
            self.pin_blocks[comp] = pin_blocks
            chains = [b.chain_bytes for b in self.blocks if b.component == comp and b not in pin_blocks]
            self.reserve[comp] = sum(b.nbytes for b in pin_blocks) + max(chains, default=0)


__all__ = ["COMPONENTS", "Block", "BlockPlan", "ComponentSpec", "Managed", "OffloadError", "bundle_components",
           "direct_tensors", "drop_weight_norm", "weight_norms"]
