"""Adapter files in and out: this project's export, the PEFT folder, DiffSynth-Studio and ComfyUI.

Readers return :class:`LoraFile` with normalised ``{module_path: LoraDelta(A, B, scale)}`` weights (see
:mod:`.keys`). The four layouts, for a rank-8 alpha-16 adapter (scale 2):

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
    ``W += alpha · B @ A`` with ``alpha=1`` by default, so the export bakes ``scale`` into ``lora_A`` (as DiffSynth
    itself does when a file carries an ``.alpha`` tensor: ``lora_A · alpha / rank``).
``comfyui`` (one ``.safetensors``)
    ``base_model.model.layers.0.self_attn.q_proj.lora_A.weight`` / ``.lora_B.weight`` + ``base_model.model.layers.0.
    self_attn.q_proj.alpha`` (0-d float32 = scale·r). ComfyUI applies ``alpha / rank`` when ``.alpha`` is present and
    1.0 otherwise, so strength 1.0 reproduces training; without the tensor a PEFT adapter would load at r/alpha of its
    strength. ``prefix="diffusion_model.decoder."`` gives ComfyUI's generic key form.

DoRA and LoKr adapters have no ``(A, B, scale)`` form: they are written to and read from the ``acestep`` and ``peft``
formats only, as canonical tensors plus a :class:`~.inject.LoraSpec` (:func:`read_adapter_state`).
"""

from __future__ import annotations

import json
import pickle
import re
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from acestep_train.checkpoints.checkpoint_io import save_safetensors_atomic
from acestep_train.lora.inject import LoraSpec, adapter_state_dict, get_spec, require_peft
from acestep_train.lora.keys import (LoraDelta, LoraError, canonical_state, lora_scale, modules_of,
                                     normalise_single_file, pair_canonical, pattern_value)

FORMATS = ("acestep", "peft", "diffsynth", "comfyui")
META_KEY = "acestep_lora"
FORMAT_VERSION = 1
PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"
PEFT_WEIGHTS_BIN = "adapter_model.bin"
PEFT_PREFIX = "base_model.model."
COMFY_PREFIXES = ("base_model.model.", "diffusion_model.decoder.")


@dataclass
class LoraFile:
    """A read adapter: normalised weights plus where they came from."""

    weights: dict[str, LoraDelta]
    format: str
    path: str
    metadata: dict[str, Any] = field(default_factory=dict)  # our header (or adapter_config.json for PEFT)


# ---- reading -----------------------------------------------------------------------------------------------------

def _read_safetensors(path: Path, tensors: bool = True) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors (or, with ``tensors=False``, ``{key: None}``) and header metadata of a safetensors file."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = dict(f.metadata() or {})
            state = {k: f.get_tensor(k) if tensors else None for k in f.keys()}
    except Exception as e:  # safetensors raises its own error types
        raise LoraError(f"{path}: not a readable safetensors file ({type(e).__name__}: {e})") from None
    return state, meta


def _our_meta(meta: Mapping[str, str]) -> dict[str, Any] | None:
    raw = meta.get(META_KEY)
    if raw is None:
        return None
    try:
        return json.loads(raw)
    except json.JSONDecodeError as e:
        raise LoraError(f"metadata {META_KEY!r} is not valid JSON: {e}") from None


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
    keys, meta = _read_safetensors(path, tensors=False)
    ours = _our_meta(meta)
    if ours and ours.get("format") in FORMATS and ours.get("format") != "peft":
        return ours["format"]
    # DiffSynth names the adapter (``lora_A.default.weight``) and writes no alpha.
    if any(re.search(r"\.lora_[AB]\.[^.]+\.weight$", k) for k in keys) and not any(k.endswith(".alpha")
                                                                                     for k in keys):
        return "diffsynth"
    return "comfyui"


def read_lora(path: str | Path, format: str | None = None) -> LoraFile:
    """Read one adapter file/folder into normalised ``(A, B, scale)`` form (plain LoRA only; DoRA/LoKr go through
    :func:`read_adapter_state`)."""
    path = Path(path)
    fmt = format or detect_format(path)
    if fmt not in FORMATS:
        raise LoraError(f"format={fmt!r}; choose one of {FORMATS}")
    if fmt == "acestep":
        return _read_acestep(path)
    if fmt == "peft":
        return _read_peft(path)
    state, meta = _read_safetensors(path)
    weights, has_alpha = normalise_single_file(state, str(path))
    if fmt == "comfyui" and not has_alpha and any(k.startswith(PEFT_PREFIX) for k in state):
        warnings.warn(f"{path}: PEFT-style keys without .alpha tensors: applying scale 1.0 as ComfyUI would. If this "
                      f"is a PEFT adapter_model.safetensors, load its folder (with {PEFT_CONFIG}) to get alpha/r.",
                      stacklevel=2)
    return LoraFile(weights, fmt, str(path), _our_meta(meta) or {})


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
    weights = {}
    for p, (A, B) in pair_canonical(state, str(path)).items():
        if A.shape[0] != rank:
            raise LoraError(f"{path}: {p} has rank {A.shape[0]}, header says {rank}")
        weights[p] = LoraDelta(A, B, lora_scale(alpha, rank, bool(info.get("use_rslora"))))
    return LoraFile(weights, "acestep", str(path), info)


def _read_peft_state(path: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor], dict[str, str]]:
    folder = path if path.is_dir() else path.parent
    cfg_path = folder / PEFT_CONFIG
    if not cfg_path.is_file():
        raise LoraError(f"{folder}: no {PEFT_CONFIG}; a PEFT adapter folder needs it (alpha lives only there)")
    weights_path = next((folder / n for n in (PEFT_WEIGHTS, PEFT_WEIGHTS_BIN) if (folder / n).is_file()), None)
    if weights_path is None:
        raise LoraError(f"{folder}: neither {PEFT_WEIGHTS} nor {PEFT_WEIGHTS_BIN} present")
    config = json.loads(cfg_path.read_text())
    if weights_path.suffix == ".safetensors":
        state, meta = _read_safetensors(weights_path)
    else:
        try:  # weights_only: a pickle holding code is refused, never run
            state, meta = torch.load(weights_path, map_location="cpu", weights_only=True), {}
        except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as e:
            raise LoraError(f"{weights_path}: not a plain tensor file, refused without running its code "
                            f"({str(e).strip().splitlines()[0]})") from None
    state = {k.removeprefix(PEFT_PREFIX): v for k, v in state.items()}
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
    for p, (A, B) in pair_canonical(state, str(path)).items():
        rank = int(pattern_value(config.get("rank_pattern"), p, r))
        a = float(pattern_value(config.get("alpha_pattern"), p, alpha))
        if A.shape[0] != rank:
            raise LoraError(f"{path}: {p} has rank {A.shape[0]}, adapter_config.json says {rank}")
        weights[p] = LoraDelta(A, B, lora_scale(a, rank, rslora))
    info = dict(config)
    ours = _our_meta(meta)
    if ours:
        info[META_KEY] = ours
    return LoraFile(weights, "peft", str(path), info)


def read_adapter_state(path: str | Path, format: str | None = None) -> tuple[dict[str, torch.Tensor], LoraSpec,
                                                                              dict[str, Any]]:
    """Canonical tensors + :class:`LoraSpec` of an ``acestep`` file or ``peft`` folder (any kind: LoRA, DoRA, LoKr)."""
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
    if fmt != "peft":
        raise LoraError(f"{path}: restore_adapter reads 'acestep' files and 'peft' folders, this is {fmt!r} "
                        "(use load_adapters, or convert_lora to 'acestep')")
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


# ---- writing -----------------------------------------------------------------------------------------------------

def _meta_json(fmt: str, spec: LoraSpec, variant: str | None, provenance: Mapping[str, Any] | None,
               extra: Mapping[str, Any] | None = None) -> str:
    from acestep_train import __version__

    info: dict[str, Any] = {
        "format_version": FORMAT_VERSION, "format": fmt, "kind": spec.kind, "use_dora": spec.use_dora,
        "use_rslora": spec.use_rslora, "rank": spec.rank, "alpha": spec.alpha, "scale": spec.scale,
        "dropout": spec.dropout, "targets": spec.targets, "num_modules": len(spec.modules), "variant": variant,
        "provenance": dict(provenance or {}), "created_by": f"acestep-train {__version__}",
    }
    info.update(extra or {})
    return json.dumps(info, sort_keys=True, default=str)


def _cast(t: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    return t if dtype is None else t.to(dtype)


def export_lora(decoder: nn.Module, path: str | Path, format: str = "acestep", *, adapter_name: str = "default",
                variant: str | None = None, provenance: Mapping[str, Any] | None = None,
                dtype: torch.dtype | None = None, prefix: str = PEFT_PREFIX) -> Path:
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
    """Write canonical adapter tensors (:func:`~.inject.adapter_state_dict` names) + their :class:`LoraSpec`."""
    path = Path(path)
    if format == "acestep":
        meta = {"format": "pt", META_KEY: _meta_json("acestep", spec, variant, provenance)}
        save_safetensors_atomic({k: _cast(v, dtype) for k, v in state.items()}, path, meta)
        return path
    if format == "peft":
        return _write_peft(state, spec, path, variant, provenance, dtype)
    if format not in FORMATS:
        raise LoraError(f"format={format!r}; choose one of {FORMATS}")
    if spec.kind != "lora" or spec.use_dora:
        raise LoraError(f"format {format!r} holds plain LoRA only; a {spec.variant} adapter exports to 'acestep' or "
                        "'peft' (or merge it into the weights)")
    weights = {p: LoraDelta(A, B, spec.scale) for p, (A, B) in pair_canonical(state, "adapter").items()}
    tensors = {}
    if format == "diffsynth":
        for p, w in weights.items():
            tensors[f"{p}.lora_A.default.weight"] = _cast((w.A.float() * w.scale).to(w.A.dtype), dtype)
            tensors[f"{p}.lora_B.default.weight"] = _cast(w.B, dtype)
        extra = {"scale_baked": True}
    else:
        if prefix not in COMFY_PREFIXES:
            raise LoraError(f"prefix={prefix!r}; ComfyUI maps ACE-Step 1.5 LoRA keys under {COMFY_PREFIXES}")
        for p, w in weights.items():
            tensors[f"{prefix}{p}.lora_A.weight"] = _cast(w.A, dtype)
            tensors[f"{prefix}{p}.lora_B.weight"] = _cast(w.B, dtype)
            tensors[f"{prefix}{p}.alpha"] = torch.tensor(w.scale * w.rank, dtype=torch.float32)
        extra = {"prefix": prefix}
    save_safetensors_atomic(tensors, path, {"format": "pt",
                                            META_KEY: _meta_json(format, spec, variant, provenance, extra)})
    return path


def _write_peft(state, spec: LoraSpec, folder: Path, variant, provenance, dtype) -> Path:
    """``adapter_config.json`` + ``adapter_model.safetensors`` as ``PeftModel.save_pretrained`` writes them.

    ``target_modules`` lists the adapted module paths (exact matches in every PEFT version, unlike a regex);
    ``task_type`` is null so that ``PeftModel.from_pretrained`` returns a plain ``PeftModel`` whose ``forward``
    passes the DiT's arguments through unchanged. LoRA configs carry only long-standing fields so that older PEFT
    versions (the official ACE-Step environment) parse them.
    """
    folder.mkdir(parents=True, exist_ok=True)
    modules = sorted(spec.modules) or modules_of(state)
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
        config.update(peft_type="LOKR", task_type=None, inference_mode=True)
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
    return write_adapter(canonical_state(weights), spec, path, format, variant=variant, provenance=provenance,
                         dtype=dtype, prefix=prefix)


def convert_lora(src: str | Path, dst: str | Path, format: str, *, src_format: str | None = None, **kwargs) -> Path:
    """Read a LoRA in any supported layout and write it in ``format`` (the delta ``scale · B @ A`` is kept)."""
    f = read_lora(src, src_format)
    info = f.metadata.get(META_KEY, f.metadata) if f.format == "peft" else f.metadata
    kwargs.setdefault("variant", info.get("variant"))
    prov = dict(info.get("provenance") or {})
    prov.setdefault("converted_from", f"{f.format}:{Path(src).name}")
    kwargs.setdefault("provenance", prov)
    return save_lora_weights(f.weights, dst, format, **kwargs)


__all__ = ["COMFY_PREFIXES", "FORMATS", "META_KEY", "PEFT_CONFIG", "PEFT_PREFIX", "PEFT_WEIGHTS", "PEFT_WEIGHTS_BIN",
           "LoraFile", "convert_lora", "detect_format", "export_lora", "load_lora", "read_adapter_state", "read_lora",
           "save_lora_weights", "write_adapter"]
