"""Adapter tensor names in every layout we read, mapped to one normalised form.

The normalised form of a plain LoRA is ``{module_path: LoraDelta(A, B, scale)}`` with ``A [r, in]``, ``B [out, r]``
and the factor ``scale`` such that the trained weight is ``W + scale · B @ A``; module paths are relative to the DiT
(``layers.0.self_attn.q_proj``).

Key forms understood here (a single-file adapter may use any of them):

* prefixes ``base_model.model.`` (PEFT, ComfyUI), ``diffusion_model.decoder.`` / ``model.diffusion_model.decoder.`` /
  ``diffusion_model.`` (ComfyUI's generic form), ``pipe.dit.`` (DiffSynth), ``decoder.``; the underscore forms
  ``lora_unet_decoder_…``, ``lycoris_decoder_…``, ``lycoris_…``, ``lora_unet_…`` (kohya / LyCORIS: dots become
  underscores, mapped back for the DiT's Linear names, or later against the model's own names);
* suffixes ``lora_A/B[.<adapter>].weight`` (PEFT, DiffSynth), ``lora_down/up.weight``, ``_lora.down/up.weight``,
  ``.lora.down/up.weight``, ``.lora_linear_layer.down/up.weight``, and ``{stem}.alpha``.

ComfyUI and DiffSynth share the alpha rule: ``scale = alpha / rank`` when ``{stem}.alpha`` exists, else 1.0.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any, NamedTuple

import torch


class LoraError(ValueError):
    """An adapter request that cannot be honoured (bad targets, unknown adapter, unreadable file, unsupported kind)."""


class LoraMatchError(LoraError):
    """An adapter that does not fit the model (no key matches, or a shape disagrees)."""


class LoraDelta(NamedTuple):
    """One module's low-rank update: the trained weight is ``W + scale · B @ A``."""

    A: torch.Tensor  # [r, in]
    B: torch.Tensor  # [out, r]
    scale: float

    @property
    def rank(self) -> int:
        return int(self.A.shape[0])

    def delta(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return (self.scale * (self.B.to(dtype) @ self.A.to(dtype))).to(dtype)


def lora_scale(alpha: float, rank: int, use_rslora: bool = False) -> float:
    """PEFT's factor on ``B @ A``: ``alpha / r`` (rsLoRA: ``alpha / sqrt(r)``)."""
    return float(alpha) / (math.sqrt(rank) if use_rslora else rank)


# ---- canonical (PEFT) names ------------------------------------------------------------------------------------

_CANONICAL = re.compile(r"(.+)\.lora_(A|B)(?:\.[^.]+)?\.weight")
_MODULE_OF = re.compile(r"(.+?)\.(lora_[A-Za-z_]+|lokr_\w+)(\..*)?")


def pair_canonical(state: Mapping[str, torch.Tensor], where: str) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``{path}.lora_A[.name].weight`` / ``lora_B`` pairs -> ``{path: (A, B)}``; anything else is refused."""
    a, b, other = {}, {}, []
    for k, v in state.items():
        m = _CANONICAL.fullmatch(k)
        if m is None:
            other.append(k)
        else:
            (a if m.group(2) == "A" else b)[m.group(1)] = v
    if other:
        raise LoraError(f"{where}: tensors that are not plain LoRA A/B weights: {', '.join(sorted(other)[:5])} "
                        "(DoRA/LoKr adapters load as live PEFT adapters with restore_adapter())")
    check_pairs(a, b, where)
    return {p: (a[p], b[p]) for p in a}


def check_pairs(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor], where: str) -> None:
    """Every module has both halves, and they form an ``[r, in]`` / ``[out, r]`` pair."""
    lonely = sorted(set(a) ^ set(b))
    if lonely:
        raise LoraError(f"{where}: {len(lonely)} modules have only one of lora_A/lora_B (first: {lonely[:3]})")
    for p in a:
        A, B = a[p], b[p]
        if A.dim() != 2 or B.dim() != 2 or A.shape[0] != B.shape[1]:
            raise LoraError(f"{where}: {p}: lora_A {list(A.shape)} and lora_B {list(B.shape)} are not a "
                            "[r, in] / [out, r] pair (only Linear LoRA is supported)")


def canonical_state(weights: Mapping[str, LoraDelta]) -> dict[str, torch.Tensor]:
    """The inverse of :func:`pair_canonical`: ``{path}.lora_A.weight`` / ``{path}.lora_B.weight``."""
    state = {}
    for p, w in weights.items():
        state[f"{p}.lora_A.weight"] = w.A
        state[f"{p}.lora_B.weight"] = w.B
    return state


def modules_of(state: Mapping[str, torch.Tensor]) -> list[str]:
    """Module paths of canonical adapter tensor names (``….lora_A.weight``, ``….lokr_w1``, DoRA magnitudes)."""
    return sorted({m.group(1) for k in state if (m := _MODULE_OF.fullmatch(k))})


def pattern_value(patterns: Mapping[str, Any] | None, path: str, default):
    """PEFT ``rank_pattern`` / ``alpha_pattern`` lookup (a key is a regex matching a path suffix)."""
    for key, value in (patterns or {}).items():
        if re.fullmatch(rf"(.*\.)?(?:{key})", path):
            return value
    return default


# ---- single-file forms (ComfyUI, DiffSynth, kohya, LyCORIS) ----------------------------------------------------

# (regex on the tail, role of each captured word)
_SUFFIXES = (
    (re.compile(r"\.lora_(A|B)(?:\.[^.]+)?\.weight$"), {"A": "A", "B": "B"}),
    (re.compile(r"\.lora_(down|up)\.weight$"), {"down": "A", "up": "B"}),
    (re.compile(r"_lora\.(down|up)\.weight$"), {"down": "A", "up": "B"}),
    (re.compile(r"\.lora\.(down|up)\.weight$"), {"down": "A", "up": "B"}),
    (re.compile(r"\.lora_linear_layer\.(down|up)\.weight$"), {"down": "A", "up": "B"}),
)
_DOTTED_PREFIXES = ("base_model.model.", "diffusion_model.decoder.", "model.diffusion_model.decoder.",
                    "diffusion_model.", "pipe.dit.", "decoder.")
_UNDERSCORE_PREFIXES = ("lora_unet_decoder_", "lycoris_decoder_", "lycoris_", "lora_unet_")
# Tensors of adapter kinds that have no (A, B, scale) form.
UNSUPPORTED = re.compile(r"\.(dora_scale|lokr_\w+|hada_\w+|diff|diff_b|set_weight|oft_\w+|lora_magnitude_vector)$")
# The DiT's Linear names with '.' -> '_' (used when the model is not at hand; matching uses the model's names).
_UNDERSCORE_DIT = (
    (re.compile(r"layers_(\d+)_(self_attn|cross_attn)_([qkvo]_proj)"), r"layers.\1.\2.\3"),
    (re.compile(r"layers_(\d+)_mlp_(gate_proj|up_proj|down_proj)"), r"layers.\1.mlp.\2"),
    (re.compile(r"(time_embed(?:_r)?)_(linear_1|linear_2|time_proj)"), r"\1.\2"),
)


def split_lora_key(key: str) -> tuple[str, str] | None:
    """``(stem, role)`` with role ``A`` / ``B`` / ``alpha`` for a single-file LoRA key, else None."""
    if key.endswith(".alpha"):
        return key[: -len(".alpha")], "alpha"
    for rx, roles in _SUFFIXES:
        m = rx.search(key)
        if m:
            return key[: m.start()], roles[m.group(1)]
    return None


def normalise_stem(stem: str) -> str:
    """Strip ecosystem prefixes and turn ``lora_unet_decoder_layers_0_self_attn_q_proj`` style stems into module
    paths (known DiT names only; other underscore stems are kept and resolved against a model later)."""
    for p in _DOTTED_PREFIXES:
        if stem.startswith(p):
            return stem[len(p):]
    for p in _UNDERSCORE_PREFIXES:
        if stem.startswith(p):
            rest = stem[len(p):]
            for rx, repl in _UNDERSCORE_DIT:
                if rx.fullmatch(rest):
                    return rx.sub(repl, rest)
            return rest
    return stem


def normalise_single_file(state: Mapping[str, torch.Tensor], where: str) -> tuple[dict[str, LoraDelta], bool]:
    """Any single-file key form -> normalised weights, plus whether the file carried ``.alpha`` tensors."""
    a, b, alphas, unsupported, unknown = {}, {}, {}, [], []
    for k, v in state.items():
        if UNSUPPORTED.search(k):
            unsupported.append(k)
            continue
        parsed = split_lora_key(k)
        if parsed is None:
            unknown.append(k)
            continue
        stem, role = parsed
        {"A": a, "B": b, "alpha": alphas}[role][stem] = v
    if unsupported:
        raise LoraError(f"{where}: holds DoRA/LoKr/LoHa/full-diff tensors this loader cannot apply as (A, B, scale) "
                        f"(first: {', '.join(sorted(unsupported)[:3])})")
    if unknown:
        raise LoraError(f"{where}: {len(unknown)} tensors are no LoRA A/B/alpha key (first: "
                        f"{', '.join(sorted(unknown)[:3])})")
    if not a and not b:
        raise LoraError(f"{where}: no LoRA tensors found")
    check_pairs(a, b, where)
    extra = sorted(set(alphas) - set(a))
    if extra:
        raise LoraError(f"{where}: alpha tensors without LoRA weights (first: {extra[:3]})")
    weights: dict[str, LoraDelta] = {}
    for stem in a:
        A, B = a[stem], b[stem]
        scale = float(alphas[stem].float().item()) / A.shape[0] if stem in alphas else 1.0
        path = normalise_stem(stem)
        if path in weights:
            raise LoraError(f"{where}: two key forms name the same module {path}")
        weights[path] = LoraDelta(A, B, scale)
    return weights, bool(alphas)


__all__ = ["LoraDelta", "LoraError", "LoraMatchError", "canonical_state", "check_pairs", "lora_scale", "modules_of",
           "normalise_single_file", "normalise_stem", "pair_canonical", "pattern_value", "split_lora_key"]
