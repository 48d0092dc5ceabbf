"""LoRA files in and out: this project's export, the PEFT folder, DiffSynth-Studio and ComfyUI (training.md §8).

Every reader returns the same normalised form, ``{module_path: LoraDelta(A, B, scale)}`` with ``A [r, in]``,
``B [out, r]`` and the factor ``scale`` such that the trained weight is ``W + scale · B @ A``; module paths are
relative to the DiT (``layers.0.self_attn.q_proj``). The four layouts, for a rank-8 alpha-16 adapter (scale 2):

``acestep`` (one ``.safetensors``; our export)
    ``layers.0.self_attn.q_proj.lora_A.weight`` / ``.lora_B.weight`` (PEFT canonical names, also ``….lora_magnitude
    _vector`` for DoRA and ``….lokr_w1`` … for LoKr); header metadata ``acestep_lora`` = JSON with ``format``,
    ``kind``, ``rank``, ``alpha``, ``targets``, ``variant`` (model variant), ``provenance`` …; scale = alpha/r.
``peft`` (a folder, the official ACE-Step trainer's ``save_pretrained`` output)
    ``adapter_config.json`` (``peft_type``, ``r``, ``lora_alpha``, ``target_modules`` = the adapted module paths,
    ``task_type: null``) + ``adapter_model.safetensors`` with ``base_model.model.layers.0.self_attn.q_proj.lora_A.
    weight``; no alpha tensor. Loads with ``peft.PeftModel.from_pretrained(decoder, folder)`` (the official loader).
``diffsynth`` (one ``.safetensors``, DiffSynth-Studio's training output layout)
    ``layers.0.self_attn.q_proj.lora_A.default.weight`` / ``.lora_B.default.weight``; no alpha. DiffSynth fuses
    ``W += alpha · B @ A`` with ``alpha=1`` (``GeneralLoRALoader.fuse_lora_to_base_model``), so the export bakes
    ``scale`` into ``lora_A`` (as DiffSynth itself does with an ``.alpha`` tensor: ``lora_A · alpha / rank``).
``comfyui`` (one ``.safetensors``)
    ``base_model.model.layers.0.self_attn.q_proj.lora_A.weight`` / ``.lora_B.weight`` + ``base_model.model.layers.0.
    self_attn.q_proj.alpha`` (0-d float32 = scale·r). ComfyUI uses ``alpha / rank`` when ``.alpha`` is present and 1.0
    otherwise (training.md §8.3), so strength 1.0 reproduces training; without the tensor a PEFT adapter would load at
    r/alpha of its strength (pitfall 7). ``prefix="diffusion_model.decoder."`` gives ComfyUI's generic key form.

Reading is lenient: the single-file reader accepts every LoRA key form listed in training.md §8.3 (prefixes
``base_model.model.``, ``diffusion_model.decoder.``, ``diffusion_model.``, ``decoder.``, ``pipe.dit.``,
``lora_unet_decoder_…``, ``lycoris_…``; suffixes ``lora_A/B[.name].weight``, ``lora_down/up.weight``,
``_lora.down/up.weight``, ``.lora.down/up.weight``, ``.lora_linear_layer.down/up.weight``; ``.alpha``) with
ComfyUI's and DiffSynth's shared alpha rule. DoRA and LoKr cannot be written as ``(A, B, scale)``: they round-trip
through the ``acestep`` and ``peft`` formats and load as live PEFT adapters with :func:`restore_adapter`.

:func:`load_adapters` applies several files at once, each with a strength: fused into the weights
(``W += strength · scale · B @ A``) or as removable forward hooks; a file whose keys match no module raises.
"""

from __future__ import annotations

import json
import logging
import math
import re
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from acestep_train.checkpoints.checkpoint_io import save_safetensors_atomic
from acestep_train.lora.inject import (SPECS_ATTR, LoraError, LoraSpec, _adapter_params, adapter_state_dict, apply_lora, base_linear,
                     get_spec, linear_paths, require_peft, resolve_decoder)

log = logging.getLogger(__name__)

FORMATS = ("acestep", "peft", "diffsynth", "comfyui")
META_KEY = "acestep_lora"
FORMAT_VERSION = 1
PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"
PEFT_WEIGHTS_BIN = "adapter_model.bin"
PEFT_PREFIX = "base_model.model."
COMFY_PREFIXES = ("base_model.model.", "diffusion_model.decoder.")


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


@dataclass
class LoraFile:
    """A read adapter: normalised weights plus where they came from."""

    weights: dict[str, LoraDelta]
    format: str
    path: str
    metadata: dict[str, Any] = field(default_factory=dict)  # our header (or adapter_config.json for PEFT)


AdapterSource = Union[str, Path, LoraFile, Mapping[str, LoraDelta]]


# ---- small helpers -----------------------------------------------------------------------------------------------

def _read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error types
        raise LoraError(f"{path}: not a readable safetensors file ({type(e).__name__}: {e})") from None
    return tensors, meta


def _our_meta(meta: Mapping[str, str]) -> dict[str, Any] | None:
    raw = meta.get(META_KEY)
    if raw is None:
        return None
    try:
        return json.loads(raw)
    except json.JSONDecodeError as e:
        raise LoraError(f"metadata {META_KEY!r} is not valid JSON: {e}") from None


def _scale(alpha: float, rank: int, use_rslora: bool = False) -> float:
    return float(alpha) / (math.sqrt(rank) if use_rslora else rank)


def _pair_canonical(state: Mapping[str, torch.Tensor], where: str) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``{path}.lora_A[.name].weight`` / ``lora_B`` pairs -> ``{path: (A, B)}``; anything else is refused."""
    a, b, other = {}, {}, []
    for k, v in state.items():
        m = re.fullmatch(r"(.+)\.lora_(A|B)(?:\.[^.]+)?\.weight", k)
        if m is None:
            other.append(k)
        else:
            (a if m.group(2) == "A" else b)[m.group(1)] = v
    if other:
        raise LoraError(f"{where}: tensors that are not plain LoRA A/B weights: {', '.join(sorted(other)[:5])} "
                        "(DoRA/LoKr adapters load as live PEFT adapters with restore_adapter())")
    _check_pairs(a, b, where)
    return {p: (a[p], b[p]) for p in a}


def _check_pairs(a: Mapping, b: Mapping, where: str) -> None:
    lonely = sorted(set(a) ^ set(b))
    if lonely:
        raise LoraError(f"{where}: {len(lonely)} modules have only one of lora_A/lora_B (first: {lonely[:3]})")
    for p in a:
        A, B = a[p], b[p]
        if A.dim() != 2 or B.dim() != 2 or A.shape[0] != B.shape[1]:
            raise LoraError(f"{where}: {p}: lora_A {list(A.shape)} and lora_B {list(B.shape)} are not a "
                            "[r, in] / [out, r] pair (only Linear LoRA is supported)")


def _pattern_value(patterns: Mapping[str, Any], path: str, default):
    """PEFT ``rank_pattern`` / ``alpha_pattern`` lookup (a key matches a path suffix)."""
    for key, value in (patterns or {}).items():
        if re.fullmatch(rf"(.*\.)?(?:{key})", path):
            return value
    return default


# ---- format detection --------------------------------------------------------------------------------------------

def detect_format(path: str | Path) -> str:
    """``acestep`` | ``peft`` | ``diffsynth`` | ``comfyui`` from the folder/file layout and keys."""
    path = Path(path)
    if path.is_dir():
        if (path / PEFT_CONFIG).is_file():
            return "peft"
        raise LoraError(f"{path}: a folder without {PEFT_CONFIG} is no adapter this project can read")
    if not path.is_file():
        raise LoraError(f"{path}: no such adapter file or folder")
    if path.name in (PEFT_WEIGHTS, PEFT_WEIGHTS_BIN) and (path.parent / PEFT_CONFIG).is_file():
        return "peft"
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = dict(f.metadata() or {})
            keys = list(f.keys())
    except Exception as e:
        raise LoraError(f"{path}: not a readable safetensors file ({type(e).__name__}: {e})") from None
    ours = _our_meta(meta)
    if ours and ours.get("format") in FORMATS and ours.get("format") != "peft":
        return ours["format"]
    if any(re.search(r"\.lora_[AB]\.[^.]+\.weight$", k) for k in keys) and not any(k.endswith(".alpha")
                                                                                     for k in keys):
        return "diffsynth"
    return "comfyui"


# ---- readers -----------------------------------------------------------------------------------------------------

def read_lora(path: str | Path, format: str | None = None) -> LoraFile:
    """Read one adapter file/folder into normalised ``(A, B, scale)`` form (LoRA only; see :func:`restore_adapter`
    for DoRA/LoKr)."""
    path = Path(path)
    fmt = format or detect_format(path)
    if fmt not in FORMATS:
        raise LoraError(f"format={fmt!r}; choose one of {FORMATS}")
    if fmt == "acestep":
        return _read_acestep(path)
    if fmt == "peft":
        return _read_peft(path)
    return _read_single(path, fmt)


def load_lora(path: str | Path, format: str | None = None) -> dict[str, LoraDelta]:
    """``{module_path: LoraDelta(A, B, scale)}`` of one adapter file/folder."""
    return read_lora(path, format).weights


def _read_acestep(path: Path) -> LoraFile:
    state, meta = _read_safetensors(path)
    info = _our_meta(meta)
    if not info:
        raise LoraError(f"{path}: no {META_KEY!r} metadata; not an acestep-train export (try format='comfyui')")
    kind = info.get("kind", "lora")
    if kind != "lora" or info.get("use_dora"):
        raise LoraError(f"{path}: a {'DoRA' if info.get('use_dora') else kind} adapter has no (A, B, scale) form; "
                        "load it as a live PEFT adapter with restore_adapter()")
    rank, alpha = int(info["rank"]), float(info["alpha"])
    pairs = _pair_canonical(state, str(path))
    weights = {}
    for p, (A, B) in pairs.items():
        if A.shape[0] != rank:
            raise LoraError(f"{path}: {p} has rank {A.shape[0]}, header says {rank}")
        weights[p] = LoraDelta(A, B, _scale(alpha, rank, bool(info.get("use_rslora"))))
    return LoraFile(weights, "acestep", str(path), info)


def _peft_paths(path: Path) -> tuple[Path, Path]:
    folder = path if path.is_dir() else path.parent
    cfg = folder / PEFT_CONFIG
    if not cfg.is_file():
        raise LoraError(f"{folder}: no {PEFT_CONFIG}; a PEFT adapter folder needs it (alpha lives only there)")
    for name in (PEFT_WEIGHTS, PEFT_WEIGHTS_BIN):
        if (folder / name).is_file():
            return cfg, folder / name
    raise LoraError(f"{folder}: neither {PEFT_WEIGHTS} nor {PEFT_WEIGHTS_BIN} present")


def _read_peft_state(path: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor], dict[str, str]]:
    cfg_path, weights_path = _peft_paths(path)
    config = json.loads(cfg_path.read_text())
    if weights_path.suffix == ".safetensors":
        state, meta = _read_safetensors(weights_path)
    else:
        state, meta = torch.load(weights_path, map_location="cpu", weights_only=True), {}
    state = {k[len(PEFT_PREFIX):] if k.startswith(PEFT_PREFIX) else k: v for k, v in state.items()}
    return config, state, meta


def _read_peft(path: Path) -> LoraFile:
    config, state, meta = _read_peft_state(path)
    peft_type = str(config.get("peft_type", "LORA")).upper()
    if peft_type != "LORA" or config.get("use_dora"):
        raise LoraError(f"{path}: a {'DoRA' if config.get('use_dora') else peft_type} adapter has no (A, B, scale) "
                        "form; load it as a live PEFT adapter with restore_adapter()")
    r, alpha = int(config["r"]), float(config["lora_alpha"])
    rslora = bool(config.get("use_rslora", False))
    weights = {}
    for p, (A, B) in _pair_canonical(state, str(path)).items():
        rank = int(_pattern_value(config.get("rank_pattern"), p, r))
        a = float(_pattern_value(config.get("alpha_pattern"), p, alpha))
        if A.shape[0] != rank:
            raise LoraError(f"{path}: {p} has rank {A.shape[0]}, adapter_config.json says {rank}")
        weights[p] = LoraDelta(A, B, _scale(a, rank, rslora))
    info = dict(config)
    ours = _our_meta(meta)
    if ours:
        info[META_KEY] = ours
    return LoraFile(weights, "peft", str(path), info)


# Single-file LoRA key forms (training.md §8.3 ComfyUI; DiffSynth GeneralLoRALoader): (regex on the tail, role).
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
_UNSUPPORTED = re.compile(r"\.(dora_scale|lokr_\w+|hada_\w+|diff|diff_b|set_weight|oft_\w+|lora_magnitude_vector)$")
# The DiT's Linear names with '.' -> '_' (used when the model is not at hand; load_adapters uses the model's names).
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


def _read_single(path: Path, fmt: str) -> LoraFile:
    """DiffSynth / ComfyUI style file: scale = alpha / rank when ``{stem}.alpha`` exists, else 1.0."""
    state, meta = _read_safetensors(path)
    a, b, alphas, unsupported, unknown = {}, {}, {}, [], []
    for k, v in state.items():
        if _UNSUPPORTED.search(k):
            unsupported.append(k)
            continue
        parsed = split_lora_key(k)
        if parsed is None:
            unknown.append(k)
            continue
        stem, role = parsed
        {"A": a, "B": b, "alpha": alphas}[role][stem] = v
    if unsupported:
        raise LoraError(f"{path}: holds DoRA/LoKr/LoHa/full-diff tensors this loader cannot apply as (A, B, scale) "
                        f"(first: {', '.join(sorted(unsupported)[:3])})")
    if unknown:
        raise LoraError(f"{path}: {len(unknown)} tensors are no LoRA A/B/alpha key (first: "
                        f"{', '.join(sorted(unknown)[:3])})")
    if not a and not b:
        raise LoraError(f"{path}: no LoRA tensors found")
    _check_pairs(a, b, str(path))
    weights: dict[str, LoraDelta] = {}
    for stem in a:
        A, B = a[stem], b[stem]
        scale = 1.0
        if stem in alphas:
            scale = float(alphas[stem].float().item()) / A.shape[0]
        path_ = normalise_stem(stem)
        if path_ in weights:
            raise LoraError(f"{path}: two key forms name the same module {path_}")
        weights[path_] = LoraDelta(A, B, scale)
    extra = sorted(set(alphas) - set(a))
    if extra:
        raise LoraError(f"{path}: alpha tensors without LoRA weights (first: {extra[:3]})")
    info = _our_meta(meta) or {}
    if fmt == "comfyui" and not alphas and any(k.startswith(PEFT_PREFIX) for k in state):
        warnings.warn(f"{path}: PEFT-style keys without .alpha tensors: applying scale 1.0 as ComfyUI would. If this "
                      f"is a PEFT adapter_model.safetensors, load its folder (with {PEFT_CONFIG}) to get alpha/r.",
                      stacklevel=3)
    return LoraFile(weights, fmt, str(path), info)


_MODULE_OF = re.compile(r"(.+?)\.(lora_[A-Za-z_]+|lokr_\w+)(\..*)?")


def _modules_of(state: Mapping[str, torch.Tensor]) -> list[str]:
    """Module paths of canonical adapter tensor names (``….lora_A.weight``, ``….lokr_w1``, DoRA magnitudes)."""
    return sorted({m.group(1) for k in state if (m := _MODULE_OF.fullmatch(k))})


# ---- writers -----------------------------------------------------------------------------------------------------

def _meta_json(fmt: str, spec: LoraSpec, variant: str | None, provenance: Mapping[str, Any] | None,
               extra: Mapping[str, Any] | None = None) -> str:
    from acestep_train import __version__

    info: dict[str, Any] = {
        "format_version": FORMAT_VERSION,
        "format": fmt,
        "kind": spec.kind,
        "use_dora": spec.use_dora,
        "use_rslora": spec.use_rslora,
        "rank": spec.rank,
        "alpha": spec.alpha,
        "scale": spec.scale,
        "dropout": spec.dropout,
        "targets": spec.targets,
        "num_modules": len(spec.modules),
        "variant": variant,
        "provenance": dict(provenance or {}),
        "created_by": f"acestep-train {__version__}",
    }
    info.update(extra or {})
    return json.dumps(info, sort_keys=True, default=str)


def _cast(t: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    return t if dtype is None else t.to(dtype)


def _lora_only(spec: LoraSpec, fmt: str) -> None:
    if spec.kind != "lora" or spec.use_dora:
        raise LoraError(f"format {fmt!r} holds plain LoRA only; a {spec.variant} adapter exports to 'acestep' or "
                        "'peft' (or merge it into the weights)")


def _weights_from_state(state: Mapping[str, torch.Tensor], spec: LoraSpec) -> dict[str, LoraDelta]:
    return {p: LoraDelta(A, B, spec.scale) for p, (A, B) in _pair_canonical(state, "adapter").items()}


def export_lora(
    decoder: nn.Module,
    path: str | Path,
    format: str = "acestep",
    *,
    adapter_name: str = "default",
    variant: str | None = None,
    provenance: Mapping[str, Any] | None = None,
    dtype: torch.dtype | None = None,
    prefix: str = PEFT_PREFIX,
) -> Path:
    """Write the live adapter ``adapter_name`` of the decoder in one of :data:`FORMATS`; returns the path written.

    ``path`` is a ``.safetensors`` file, or the adapter folder for ``peft``. ``variant`` (model variant, e.g.
    ``turbo``) and ``provenance`` (``shift``, ``steps``, ``trigger``, data, commit …) go into the metadata of every
    format. ``dtype`` casts the tensors (e.g. ``torch.bfloat16``); scales are baked in fp32 first. ``prefix`` is the
    ComfyUI key prefix (``base_model.model.`` or ``diffusion_model.decoder.``).
    """
    if format not in FORMATS:
        raise LoraError(f"format={format!r}; choose one of {FORMATS}")
    spec = get_spec(decoder, adapter_name)
    state = adapter_state_dict(decoder, adapter_name)
    return write_adapter(state, spec, path, format, variant=variant, provenance=provenance, dtype=dtype,
                         prefix=prefix)


def write_adapter(state: Mapping[str, torch.Tensor], spec: LoraSpec, path: str | Path, format: str, *,
                  variant: str | None = None, provenance: Mapping[str, Any] | None = None,
                  dtype: torch.dtype | None = None, prefix: str = PEFT_PREFIX) -> Path:
    """Write canonical adapter tensors (:func:`adapter_state_dict` names) + their :class:`LoraSpec`."""
    path = Path(path)
    if format == "acestep":
        meta = {"format": "pt", META_KEY: _meta_json("acestep", spec, variant, provenance)}
        save_safetensors_atomic({k: _cast(v, dtype) for k, v in state.items()}, path, meta)
        return path
    if format == "peft":
        return _write_peft(state, spec, path, variant, provenance, dtype)
    _lora_only(spec, format)
    weights = _weights_from_state(state, spec)
    if format == "diffsynth":
        tensors = {}
        for p, w in weights.items():
            tensors[f"{p}.lora_A.default.weight"] = _cast((w.A.float() * w.scale).to(w.A.dtype), dtype)
            tensors[f"{p}.lora_B.default.weight"] = _cast(w.B, dtype)
        meta = {"format": "pt", META_KEY: _meta_json("diffsynth", spec, variant, provenance, {"scale_baked": True})}
        save_safetensors_atomic(tensors, path, meta)
        return path
    if format == "comfyui":
        if prefix not in COMFY_PREFIXES:
            raise LoraError(f"prefix={prefix!r}; ComfyUI maps ACE-Step 1.5 LoRA keys under {COMFY_PREFIXES}")
        tensors = {}
        for p, w in weights.items():
            tensors[f"{prefix}{p}.lora_A.weight"] = _cast(w.A, dtype)
            tensors[f"{prefix}{p}.lora_B.weight"] = _cast(w.B, dtype)
            tensors[f"{prefix}{p}.alpha"] = torch.tensor(w.scale * w.rank, dtype=torch.float32)
        meta = {"format": "pt", META_KEY: _meta_json("comfyui", spec, variant, provenance, {"prefix": prefix})}
        save_safetensors_atomic(tensors, path, meta)
        return path
    raise LoraError(f"format={format!r}; choose one of {FORMATS}")  # pragma: no cover


def _write_peft(state, spec: LoraSpec, folder: Path, variant, provenance, dtype) -> Path:
    """``adapter_config.json`` + ``adapter_model.safetensors`` as ``PeftModel.save_pretrained`` writes them.

    ``target_modules`` lists the adapted module paths (exact matches in every PEFT version, unlike a regex);
    ``task_type`` is null so that ``PeftModel.from_pretrained`` returns a plain ``PeftModel`` whose ``forward``
    passes the DiT's arguments through unchanged. LoRA configs carry only long-standing fields so that older PEFT
    versions (the official ACE-Step environment) parse them.
    """
    folder.mkdir(parents=True, exist_ok=True)
    modules = sorted(spec.modules) or _modules_of(state)
    if spec.kind == "lora":
        config: dict[str, Any] = {
            "peft_type": "LORA", "task_type": None, "r": spec.rank, "lora_alpha": spec.alpha,
            "lora_dropout": spec.dropout, "target_modules": modules, "bias": "none", "use_rslora": spec.use_rslora,
            "use_dora": spec.use_dora, "fan_in_fan_out": False, "init_lora_weights": True, "inference_mode": True,
            "modules_to_save": None, "rank_pattern": {}, "alpha_pattern": {}, "layers_to_transform": None,
            "layers_pattern": None, "base_model_name_or_path": (provenance or {}).get("base_model"),
            "revision": None,
        }
    else:
        peft = require_peft()
        cfg = peft.LoKrConfig(r=spec.rank, alpha=spec.alpha, rank_dropout=spec.dropout, target_modules=modules)
        config = json.loads(json.dumps(cfg.to_dict(), default=lambda o: sorted(o) if isinstance(o, set) else str(o)))
        config["peft_type"] = "LOKR"
        config["task_type"] = None
        config["inference_mode"] = True
    (folder / PEFT_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    meta = {"format": "pt", META_KEY: _meta_json("peft", spec, variant, provenance)}
    save_safetensors_atomic({PEFT_PREFIX + k: _cast(v, dtype) for k, v in state.items()}, folder / PEFT_WEIGHTS, meta)
    return folder


def save_lora_weights(weights: Mapping[str, LoraDelta], path: str | Path, format: str = "acestep", *,
                      variant: str | None = None, provenance: Mapping[str, Any] | None = None,
                      dtype: torch.dtype | None = None, prefix: str = PEFT_PREFIX) -> Path:
    """Write normalised weights (e.g. read from another format) in ``format``; all modules need one rank and scale."""
    if not weights:
        raise LoraError("no LoRA weights to write")
    ranks = {w.rank for w in weights.values()}
    scales = {float(w.scale) for w in weights.values()}
    if len(ranks) != 1 or len(scales) != 1:
        raise LoraError(f"modules differ in rank {sorted(ranks)} or scale {sorted(scales)}; cannot describe them "
                        "with one (rank, alpha)")
    rank, scale = ranks.pop(), scales.pop()
    spec = LoraSpec("lora", rank, scale * rank, 0.0, sorted(weights), False, False, sorted(weights))
    state = {}
    for p, w in weights.items():
        state[f"{p}.lora_A.weight"] = w.A
        state[f"{p}.lora_B.weight"] = w.B
    return write_adapter(state, spec, path, format, variant=variant, provenance=provenance, dtype=dtype,
                         prefix=prefix)


def convert_lora(src: str | Path, dst: str | Path, format: str, *, src_format: str | None = None, **kwargs) -> Path:
    """Read a LoRA in any supported layout and write it in ``format`` (the delta ``scale · B @ A`` is kept)."""
    f = read_lora(src, src_format)
    info = f.metadata.get(META_KEY, f.metadata) if f.format == "peft" else f.metadata
    kwargs.setdefault("variant", info.get("variant"))
    prov = dict(info.get("provenance") or {})
    prov.setdefault("converted_from", f"{f.format}:{Path(src).name}")
    kwargs.setdefault("provenance", prov)
    return save_lora_weights(f.weights, dst, format, **kwargs)


# ---- applying normalised adapters --------------------------------------------------------------------------------

def _read_source(src: AdapterSource, format: str | None) -> tuple[str, dict[str, LoraDelta]]:
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


class _Hook:
    """Forward hook adding ``strength · scale · B(A(x))`` to a Linear's output."""

    def __init__(self, A: torch.Tensor, B: torch.Tensor, scale: float, strength: float):
        self.A, self.B, self.scale, self.strength = A, B, scale, strength

    def __call__(self, module, args, output):
        x = args[0]
        h = F.linear(F.linear(x.to(self.A.dtype), self.A), self.B)
        return output + (h * (self.scale * self.strength)).to(output.dtype)


@dataclass
class _Applied:
    label: str
    strength: float
    fused: bool
    entries: list[tuple[str, nn.Module, LoraDelta]]
    hooks: list[tuple[Any, _Hook]] = field(default_factory=list)
    active: bool = True


class LoadedAdapters:
    """Adapters applied by :func:`load_adapters`: change strengths, remove them (also as a context manager)."""

    def __init__(self, decoder: nn.Module):
        self.decoder = decoder
        self.adapters: list[_Applied] = []

    def __len__(self) -> int:
        return sum(a.active for a in self.adapters)

    def __enter__(self) -> "LoadedAdapters":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def _find(self, which: int | str) -> _Applied:
        if isinstance(which, int):
            return self.adapters[which]
        for a in self.adapters:
            if a.label == which or Path(a.label).name == which:
                return a
        raise KeyError(f"no loaded adapter {which!r}; have {[a.label for a in self.adapters]}")

    @property
    def labels(self) -> list[str]:
        return [a.label for a in self.adapters if a.active]

    def set_strength(self, which: int | str, strength: float) -> None:
        """New strength for one adapter (hooks: immediate; fused: adds the difference to the weights)."""
        a = self._find(which)
        if not a.active:
            raise LoraError(f"adapter {a.label} was removed")
        if a.fused:
            _fuse(a.entries, float(strength) - a.strength)
        else:
            for _, hook in a.hooks:
                hook.strength = float(strength)
        a.strength = float(strength)

    def remove(self, which: int | str | None = None) -> None:
        """Take adapters off: hooks are removed (exact); fused deltas are subtracted (exact up to float rounding in
        the weights' dtype)."""
        for a in [self._find(which)] if which is not None else self.adapters:
            if not a.active:
                continue
            if a.fused:
                _fuse(a.entries, -a.strength)
            else:
                for handle, _ in a.hooks:
                    handle.remove()
                a.hooks.clear()
            a.active = False


@torch.no_grad()
def _fuse(entries, strength: float) -> None:
    if strength == 0:
        return
    for _, module, w in entries:
        weight = base_linear(module).weight
        delta = (strength * w.scale) * (w.B.to(weight.device, torch.float32) @ w.A.to(weight.device, torch.float32))
        weight.copy_((weight.float() + delta).to(weight.dtype))


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
    weights untouched and adds ``strength · scale · B(A(x))`` through forward hooks (A, B in ``dtype``, default the
    layer's dtype), removable with the returned handle. ``decoder`` may be an ``AceStepModel``; PEFT-wrapped layers
    are handled (fusing goes into ``base_layer``). Every adapter is matched before anything is applied.
    """
    decoder = resolve_decoder(decoder)
    plan = []
    for item in adapters:
        src, strength = item if isinstance(item, tuple) else (item, 1.0)
        label, weights = _read_source(src, format)
        plan.append((label, float(strength), match_adapter(decoder, weights, label)))
    handle = LoadedAdapters(decoder)
    for label, strength, entries in plan:
        applied = _Applied(label, strength, fuse, entries)
        if fuse:
            _fuse(entries, strength)
        else:
            for _, module, w in entries:
                weight = base_linear(module).weight
                dt = dtype or weight.dtype
                hook = _Hook(w.A.to(weight.device, dt), w.B.to(weight.device, dt), w.scale, strength)
                applied.hooks.append((module.register_forward_hook(hook), hook))
        handle.adapters.append(applied)
        log.info("LoRA %s: %d modules, strength %g, %s", label, len(entries), strength, "fused" if fuse else "hooks")
    return handle


def load_adapters_fused_into_base(decoder: nn.Module, adapters: Iterable[AdapterSource | tuple[AdapterSource, float]],
                                  format: str | None = None) -> LoadedAdapters:
    """Fuse adapters into the frozen base weights before training (differential LoRA): ``load_adapters(fuse=True)``.

    With a trainable PEFT adapter already injected the deltas go into each ``base_layer``; the fused base is not part
    of a checkpoint of trainable tensors, so a resumed run must fuse the same adapters again.
    """
    return load_adapters(decoder, adapters, fuse=True, format=format)


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
        peft = require_peft()
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
                          "initial values", stacklevel=2)
        peft.set_peft_model_state_dict(dec, dict(state), adapter_name=adapter_name)
        return len(_modules_of(state))
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


# ---- live PEFT adapters from our / PEFT files (all kinds, for resuming and DoRA/LoKr) ----------------------------

def read_adapter_state(path: str | Path, format: str | None = None) -> tuple[dict[str, torch.Tensor], LoraSpec,
                                                                              dict[str, Any]]:
    """Canonical tensors + :class:`LoraSpec` of an ``acestep`` file or ``peft`` folder (any kind)."""
    path = Path(path)
    fmt = format or detect_format(path)
    if fmt == "acestep":
        state, meta = _read_safetensors(path)
        info = _our_meta(meta)
        if not info:
            raise LoraError(f"{path}: no {META_KEY!r} metadata; not an acestep-train export")
        spec = LoraSpec(info.get("kind", "lora"), int(info["rank"]), float(info["alpha"]),
                        float(info.get("dropout", 0.0)), info.get("targets", ""), bool(info.get("use_dora")),
                        bool(info.get("use_rslora")), [])
        return state, spec, info
    if fmt == "peft":
        config, state, meta = _read_peft_state(path)
        if config.get("rank_pattern") or config.get("alpha_pattern"):
            raise LoraError(f"{path}: rank_pattern/alpha_pattern adapters are not supported as live adapters; "
                            "use load_adapters()")
        peft_type = str(config.get("peft_type", "LORA")).upper()
        if peft_type == "LORA":
            spec = LoraSpec("lora", int(config["r"]), float(config["lora_alpha"]),
                            float(config.get("lora_dropout") or 0.0), config.get("target_modules") or "",
                            bool(config.get("use_dora")), bool(config.get("use_rslora")), [])
        elif peft_type == "LOKR":
            spec = LoraSpec("lokr", int(config["r"]), float(config["alpha"]), float(config.get("rank_dropout") or 0.0),
                            config.get("target_modules") or "", False, False, [])
        else:
            raise LoraError(f"{path}: peft_type {peft_type} is not supported (LORA, LOKR)")
        ours = _our_meta(meta)
        if ours and ours.get("targets"):
            spec.targets = ours["targets"]  # as trained; adapter_config.json lists the expanded module paths
        return state, spec, config
    raise LoraError(f"{path}: restore_adapter reads 'acestep' files and 'peft' folders, this is {fmt!r} "
                    "(use load_adapters, or convert_lora to 'acestep')")


def restore_adapter(decoder: nn.Module, path: str | Path, *, adapter_name: str = "default", trainable: bool = False,
                    format: str | None = None, adapter_dtype: torch.dtype | None = torch.float32) -> LoraSpec:
    """Inject a saved adapter (LoRA, DoRA or LoKr) as a live PEFT adapter with its saved weights, exactly.

    Used to resume training (``trainable=True``) and to run DoRA/LoKr adapters. Every saved tensor must land in the
    model and every injected adapter tensor must come from the file.
    """
    peft = require_peft()
    state, spec, _ = read_adapter_state(path, format)
    modules = _modules_of(state)
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
    result = peft.set_peft_model_state_dict(dec, {k: v for k, v in state.items()}, adapter_name=adapter_name)
    unexpected = list(getattr(result, "unexpected_keys", []) or [])
    if unexpected:
        raise LoraMatchError(f"{path}: PEFT did not place {len(unexpected)} tensors (first {unexpected[:3]})")
    live_spec = get_spec(dec, adapter_name)
    if spec.targets:
        live_spec.targets = spec.targets  # as trained (regex or list), not the expanded module list
    getattr(dec, SPECS_ATTR)[adapter_name] = live_spec
    for _, p in _adapter_params(dec, adapter_name):
        p.requires_grad_(trainable)
    return live_spec


__all__ = ["FORMATS", "LoraDelta", "LoraFile", "LoraMatchError", "LoadedAdapters", "convert_lora", "detect_format",
           "export_lora", "load_adapter_into_trainable", "load_adapters", "load_adapters_fused_into_base", "load_lora", "match_adapter", "read_adapter_state", "read_lora",
           "restore_adapter", "save_lora_weights", "split_lora_key", "normalise_stem", "write_adapter"]
