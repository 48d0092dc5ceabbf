"""From ``model.*`` config to ready modules: resolve the source (local folder or modelscope id), build the
DiT on the meta device, assign the released weights once in the requested dtype, load the VAE, the text
encoder and the silence latent.

A released repository looks like::

    <source>/<subfolder>/{config.json, model.safetensors | model-*.safetensors, silence_latent.pt}
    <components>/vae/{config.json, diffusion_pytorch_model.safetensors}
    <components>/Qwen3-Embedding-0.6B/{config.json, model.safetensors, tokenizer files}
"""

from __future__ import annotations

import dataclasses
import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from acestep_train.checkpoints.checkpoint_io import (SILENCE_LATENT_FILE, CheckpointError, iter_safetensors, load_silence_latent, read_json,
                            save_safetensors_atomic, save_silence_latent, weight_files)
from acestep_train.models.acestep import AceStepModel
from acestep_train.models.config import AceStepConfig

log = logging.getLogger(__name__)

VAE_FOLDER = "vae"
TEXT_ENCODER_FOLDER = "Qwen3-Embedding-0.6B"
# Fields that define tensor shapes: a config.json that disagrees on one of these is another model family.
ARCH_FIELDS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
               "head_dim", "encoder_hidden_size", "encoder_intermediate_size", "encoder_num_attention_heads",
               "encoder_num_key_value_heads", "in_channels", "patch_size", "audio_acoustic_hidden_dim",
               "text_hidden_dim", "timbre_hidden_dim", "num_lyric_encoder_hidden_layers",
               "num_timbre_encoder_hidden_layers", "num_attention_pooler_hidden_layers", "fsq_dim", "fsq_input_levels")
MODELSCOPE_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of {sorted(DTYPES)}")
    return DTYPES[dtype]


# ---- sources ---------------------------------------------------------------------------------------------------

def resolve_source(source: str, cache_dir: str | Path | None = None, allow_patterns: list[str] | None = None) -> Path:
    """A local folder as is, or a modelscope model id downloaded (only ``allow_patterns``) into ``cache_dir``."""
    path = Path(source).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise CheckpointError(f"{source}: model.source must be a folder or a modelscope id, this is a file")
    if not MODELSCOPE_ID.match(str(source)) or str(source).startswith((".", "/", "~")):
        raise CheckpointError(f"{source}: no such folder, and not a modelscope model id like 'ACE-Step/Ace-Step1.5'")
    from modelscope import snapshot_download  # imported lazily: only downloads need it

    log.info("fetching %s from modelscope into %s (patterns %s)", source, cache_dir, allow_patterns)
    try:
        local = snapshot_download(str(source), cache_dir=None if cache_dir is None else str(cache_dir),
                                  allow_patterns=allow_patterns)
    except Exception as e:  # modelscope raises many unrelated types for network/auth/not-found
        raise CheckpointError(f"{source}: could not fetch this modelscope model id ({type(e).__name__}: {e})") from None
    return Path(local)


# ---- the DiT checkpoint ------------------------------------------------------------------------------------------

def check_config_json(folder: Path, arch: AceStepConfig) -> None:
    """Refuse a folder whose ``config.json`` describes a different architecture than the selected model."""
    path = folder / "config.json"
    if not path.is_file():
        return
    found = read_json(path)
    expected = dataclasses.asdict(arch)
    wrong = [f"{k}: file has {found[k]!r}, model config expects {expected[k]!r}"
             for k in ARCH_FIELDS if k in found and found[k] is not None and expected.get(k) is not None
             and found[k] != expected[k]]
    if wrong:
        raise CheckpointError(f"{path}: architecture does not match the selected model config "
                              f"(wrong model family/variant?): " + "; ".join(wrong[:5]))


def _mismatch_message(where: str, missing, unexpected, misshaped) -> str:
    parts = []
    for label, items in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped)):
        if items:
            parts.append(f"{len(items)} {label} (first: {', '.join(items[:5])})")
    return f"{where}: keys do not match the model: " + "; ".join(parts)


def assign_state_dict(module: torch.nn.Module, tensors, where: str, dtype: torch.dtype | None = None) -> None:
    """Assign ``(key, tensor)`` pairs into a (meta-device) module with strict key and shape checking.

    Tensors are assigned, not copied, so the weights exist once in memory.
    """
    expected = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    got: dict[str, torch.Tensor] = {}
    unexpected, misshaped = [], []
    for key, t in tensors:
        if key not in expected:
            unexpected.append(key)
        elif tuple(t.shape) != expected[key]:
            misshaped.append(f"{key} {list(t.shape)} (model {list(expected[key])})")
        else:
            got[key] = t if dtype is None or not t.is_floating_point() else t.to(dtype)
    missing = [k for k in expected if k not in got]
    if missing or unexpected or misshaped:
        raise CheckpointError(_mismatch_message(where, missing, unexpected, misshaped))
    module.load_state_dict(got, strict=True, assign=True)


def build_acestep_model(arch: AceStepConfig, folder: Path | None = None, dtype: torch.dtype = torch.float32,
                        seed: int = 0) -> AceStepModel:
    """Released weights from ``folder`` (meta construction + assign), or random init when ``folder`` is None."""
    if folder is None:
        torch.manual_seed(seed)
        return AceStepModel(arch).to(dtype)
    folder = Path(folder)
    files = weight_files(folder)
    check_config_json(folder, arch)
    with torch.device("meta"):
        model = AceStepModel(arch)
    assign_state_dict(model, iter_safetensors(files, dtype), where=", ".join(str(f) for f in files))
    return model


def save_acestep_model(model: AceStepModel, folder: Path, max_shard_bytes: int | None = None,
                       dtype: torch.dtype | None = None) -> list[Path]:
    """Write ``model.safetensors`` (or ``model-0000N-of-0000M.safetensors`` shards) + ``config.json``.

    ``dtype``: cast every floating tensor to it (a full fine-tune trains float32 masters of a bf16 release; the
    export goes back to the released dtype so that every tool loads it as it loads the original)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    sd = model.state_dict()
    if dtype is not None:
        sd = {k: v.to(dtype) if v.is_floating_point() else v for k, v in sd.items()}
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for k, v in sd.items():
        nbytes = v.numel() * v.element_size()
        if max_shard_bytes and shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][k] = v
        size += nbytes
    if len(shards) == 1:
        names = ["model.safetensors"]
    else:
        names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    paths = []
    for name, shard in zip(names, shards):
        save_safetensors_atomic(shard, folder / name, metadata={"format": "pt"})
        paths.append(folder / name)
    import json
    (folder / "config.json").write_text(json.dumps(model.config.to_dict(), indent=2) + "\n")
    return paths


# ---- the whole bundle ---------------------------------------------------------------------------------------------

@dataclass
class SamplingDefaults:
    """How a variant is sampled when the request does not say (``docs/pipeline.md`` §5)."""

    steps: int = 8
    schedule: str = "turbo"  # turbo (official 8-step tables) | linear (linspace + shift) | continuous
    shift: float = 3.0
    guidance: str = "none"  # none | cfg | apg
    guidance_scale: float = 1.0
    guidance_interval: tuple[float, float] = (0.0, 1.0)


@dataclass
class ModelBundle:
    """Everything needed to train or sample one variant."""

    name: str
    model: AceStepModel
    vae: Any  # AudioVAE
    text_encoder: Any  # TextEncoder
    silence_latent: torch.Tensor  # [1, T, 64]
    sampling: SamplingDefaults
    source: str | None = None
    files: dict[str, str] = field(default_factory=dict)

    @property
    def config(self) -> AceStepConfig:
        return self.model.config


def arch_from_cfg(arch: Mapping) -> AceStepConfig:
    return AceStepConfig.from_dict(dict(arch))


def load_bundle(cfg: Mapping, device: str | torch.device = "cpu") -> ModelBundle:
    """Build a :class:`ModelBundle` from a ``conf/model/*.yaml`` mapping.

    ``cfg.source`` null means random initialisation (the ``tiny`` model); otherwise the files are read from
    the source folder (or fetched from modelscope) exactly as released.
    """
    from acestep_train.models.text_encoder import TextEncoder
    from acestep_train.models.vae import AudioVAE

    cfg = dict(cfg)
    name = cfg.get("name", "?")
    arch = arch_from_cfg(cfg["arch"])
    dtype = parse_dtype(cfg.get("dtype", "float32"))
    sampling = SamplingDefaults(**{k: (tuple(v) if k == "guidance_interval" else v)
                                   for k, v in dict(cfg.get("sampling") or {}).items()})
    source = cfg.get("source")
    if source is None:
        return _random_bundle(name, cfg, arch, dtype, sampling, device)

    subfolder = cfg.get("subfolder") or ""
    components = cfg.get("components_source") or source
    cache_dir = cfg.get("cache_dir")
    vae_folder = cfg.get("vae_subfolder", VAE_FOLDER)
    te_folder = cfg.get("text_encoder_subfolder", TEXT_ENCODER_FOLDER)
    silence_rel = cfg.get("silence_latent")
    if components == source:
        # One repository holds everything (ACE-Step/Ace-Step1.5): fetch only our folders, not the 5 Hz LMs.
        patterns = None
        if subfolder:
            patterns = [f"{p}/*" for p in (subfolder, vae_folder, te_folder)] + ([silence_rel] if silence_rel else [])
        root = resolve_source(source, cache_dir, patterns)
        comp_root = root
    else:
        root = resolve_source(source, cache_dir, None)
        comp_root = resolve_source(components, cache_dir,
                                   [f"{vae_folder}/*", f"{te_folder}/*"] + ([silence_rel] if silence_rel else []))
    dit_folder = root / subfolder if subfolder else root
    model = build_acestep_model(arch, dit_folder, dtype)
    silence_path = dit_folder / SILENCE_LATENT_FILE
    if silence_rel:
        silence_path = comp_root / silence_rel
    elif not silence_path.is_file():
        raise CheckpointError(f"{silence_path}: missing; set model.silence_latent to a path inside "
                              f"{components} (e.g. acestep-v15-turbo/silence_latent.pt)")
    for sub in (vae_folder, te_folder):
        if not (comp_root / sub).is_dir():
            raise CheckpointError(f"{comp_root / sub}: folder missing from {components}")
    vae = AudioVAE.from_pretrained(comp_root / vae_folder, dtype=cfg_dtype(cfg, "vae_dtype", torch.float32))
    te = TextEncoder.from_pretrained(comp_root / te_folder, dtype=cfg_dtype(cfg, "text_encoder_dtype", dtype),
                                     **dict(cfg.get("text_encoder_limits") or {}))
    silence = load_silence_latent(silence_path)
    if silence.shape[-1] != arch.audio_acoustic_hidden_dim:
        raise CheckpointError(f"{silence_path}: {silence.shape[-1]} channels, model expects "
                              f"{arch.audio_acoustic_hidden_dim}")
    log.info("loaded %s: DiT %s, VAE %s, text encoder %s, silence %s", name, dit_folder, comp_root / vae_folder,
             comp_root / te_folder, silence_path)
    files = {"dit": str(dit_folder), "vae": str(comp_root / vae_folder), "text_encoder": str(comp_root / te_folder),
             "silence_latent": str(silence_path)}
    return ModelBundle(name, model.to(device), vae.to(device), te.to(device), silence, sampling, str(source), files)


def cfg_dtype(cfg: Mapping, key: str, default: torch.dtype) -> torch.dtype:
    return parse_dtype(cfg[key]) if cfg.get(key) else default


def _random_bundle(name, cfg, arch, dtype, sampling, device) -> ModelBundle:
    """Random weights at the configured size: the ``tiny`` model for tests, demos and the embedded default."""
    from acestep_train.models.text_encoder import TextEncoder
    from acestep_train.models.tiny_tokenizer import TINY_QWEN3_CONFIG, build_tiny_tokenizer
    from acestep_train.models.vae import TINY_VAE_CONFIG, AudioVAE

    seed = int(cfg.get("seed", 0))
    model = build_acestep_model(arch, None, dtype, seed)
    torch.manual_seed(seed + 1)
    vae_cfg = cfg.get("vae", "tiny")
    vae = AudioVAE.from_config(dict(TINY_VAE_CONFIG) if vae_cfg == "tiny" else dict(vae_cfg))
    torch.manual_seed(seed + 2)
    te_cfg = cfg.get("text_encoder", "tiny")
    te = TextEncoder.from_config(dict(TINY_QWEN3_CONFIG) if te_cfg == "tiny" else dict(te_cfg), build_tiny_tokenizer(),
                                 **dict(cfg.get("text_encoder_limits") or {}))
    silence = make_silence_latent(vae, frames=int(cfg.get("silence_frames", 15000)))
    return ModelBundle(name, model.to(device), vae.to(device), te.to(device), silence, sampling, None, {})


@torch.no_grad()
def make_silence_latent(vae, frames: int, seconds: float = 2.0) -> torch.Tensor:
    """The VAE posterior mean of digital silence, tiled to ``frames`` (what ``silence_latent.pt`` holds)."""
    n = int(seconds * vae.sample_rate) // vae.hop_length * vae.hop_length
    lat = vae.encode(torch.zeros(1, 2, n, dtype=next(vae.parameters()).dtype), sample=False).float()
    reps = -(-frames // lat.shape[1])
    return lat.repeat(1, reps, 1)[:, :frames].contiguous()


def save_released_layout(bundle: ModelBundle, root: Path, subfolder: str = "acestep-v15-turbo",
                         max_shard_bytes: int | None = None) -> Path:
    """Write a bundle as a released repository (DiT folder + ``vae/`` + text encoder folder)."""
    root = Path(root)
    dit = root / subfolder
    save_acestep_model(bundle.model, dit, max_shard_bytes)
    save_silence_latent(bundle.silence_latent, dit / SILENCE_LATENT_FILE)
    bundle.vae.save_pretrained(root / VAE_FOLDER)
    bundle.text_encoder.save_pretrained(root / TEXT_ENCODER_FOLDER)
    return root


__all__ = ["CheckpointError", "ModelBundle", "SamplingDefaults", "load_bundle", "build_acestep_model",
           "save_acestep_model", "save_released_layout", "resolve_source", "assign_state_dict", "parse_dtype",
           "save_safetensors_atomic"]
