"""Random-weight model folders at the full released size, written from the key manifests.

The manifests (``acestep_train/checkpoints/manifests/*.keys.json``; before they were carried in the repository:
``shared/reference/checkpoints``) list every tensor name and shape of the released files. From them this writes a
folder laid out like ``ACE-Step/Ace-Step1.5``: ``<dit subfolder>/`` (``model*.safetensors`` in bfloat16 shards,
``config.json``, ``silence_latent.pt``), ``vae/`` (float32) and ``Qwen3-Embedding-0.6B/`` (bfloat16; the offline
byte tokenizer stands in for Qwen's, which cannot be downloaded here). The DiT is written one shard at a time, so
building the 10 GB XL folder needs about one shard of memory.

Values are random but sane, so that sampling stays finite: norm scales and weight-norm magnitudes 1, biases and
log-scale snake parameters 0, matrices ~ N(0, 1/fan_in), embeddings ~ N(0, 0.02²).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from safetensors.torch import save_file

from acestep_train.checkpoints import MANIFEST_DIR

DIT_MANIFEST = {"2b": "acestep-v15-2B.keys.json", "xl": "acestep-v15-XL.keys.json"}
SHARD_BYTES = 1 << 30


def manifest(name: str) -> dict[str, list[int]]:
    return json.loads((MANIFEST_DIR / name).read_text())  # shipped in the package


def random_tensor(key: str, shape: list[int], dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    leaf = key.rsplit(".", 1)[-1]
    if leaf in ("bias", "alpha", "beta") or (len(shape) == 1 and "norm" not in key):
        return torch.zeros(shape, dtype=dtype)
    if "norm" in key or leaf == "weight_g":
        return torch.ones(shape, dtype=dtype)
    if "embed_tokens" in key or "null_condition_emb" in key or "special_token" in key or "scale_shift" in key:
        return (torch.randn(shape, generator=gen) * 0.02).to(dtype)
    fan_in = math.prod(shape[1:]) if len(shape) > 1 else shape[0]
    return (torch.randn(shape, generator=gen) / math.sqrt(max(1, fan_in))).to(dtype)


def write_sharded(keys: dict[str, list[int]], folder: Path, stem: str, dtype: torch.dtype, seed: int,
                  shard_bytes: int | None = SHARD_BYTES) -> list[Path]:
    """``<stem>.safetensors`` or ``<stem>-0000i-of-0000n.safetensors``, one shard in memory at a time."""
    size = torch.tensor([], dtype=dtype).element_size()
    groups: list[list[str]] = [[]]
    total = 0
    for key, shape in keys.items():
        nbytes = math.prod(shape) * size
        if shard_bytes and groups[-1] and total + nbytes > shard_bytes:
            groups.append([])
            total = 0
        groups[-1].append(key)
        total += nbytes
    names = [f"{stem}.safetensors"] if len(groups) == 1 else \
        [f"{stem}-{i + 1:05d}-of-{len(groups):05d}.safetensors" for i in range(len(groups))]
    gen = torch.Generator().manual_seed(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for name, group in zip(names, groups):
        save_file({k: random_tensor(k, keys[k], dtype, gen) for k in group}, str(folder / name),
                  metadata={"format": "pt"})
    return [folder / n for n in names]


def build_components(root: Path) -> Path:
    """``vae/`` (float32), ``Qwen3-Embedding-0.6B/`` (bfloat16) and the turbo folder's ``silence_latent.pt``: what
    ``ACE-Step/Ace-Step1.5`` provides to every variant (``model.components_source``)."""
    from acestep_train.models.text_encoder import RELEASED_QWEN3_CONFIG
    from acestep_train.models.tiny_tokenizer import build_tiny_tokenizer
    from acestep_train.models.vae import RELEASED_VAE_CONFIG

    vae = root / "vae"
    write_sharded(manifest("vae.keys.json"), vae, "diffusion_pytorch_model", torch.float32, seed=3, shard_bytes=None)
    (vae / "config.json").write_text(json.dumps(RELEASED_VAE_CONFIG, indent=2) + "\n")
    te = root / "Qwen3-Embedding-0.6B"
    write_sharded(manifest("qwen3-embedding-0.6b.keys.json"), te, "model", torch.bfloat16, seed=4, shard_bytes=None)
    te_cfg = {**RELEASED_QWEN3_CONFIG, "model_type": "qwen3", "architectures": ["Qwen3Model"],
              "torch_dtype": "bfloat16"}
    (te / "config.json").write_text(json.dumps(te_cfg, indent=2) + "\n")
    build_tiny_tokenizer().save_pretrained(str(te))
    write_silence_latent(root / "acestep-v15-turbo")
    return root


def write_silence_latent(folder: Path, channels: int = 64) -> None:
    from acestep_train.checkpoints.checkpoint_io import save_silence_latent

    folder.mkdir(parents=True, exist_ok=True)
    silence = torch.randn(1, 15000, channels, generator=torch.Generator().manual_seed(2)) * 0.1
    save_silence_latent(silence, folder / "silence_latent.pt")


def build_dit(folder: Path, variant: str) -> Path:
    """``variant``'s DiT folder: bfloat16 ``model*.safetensors`` shards, ``config.json``, ``silence_latent.pt``."""
    from omegaconf import OmegaConf

    from acestep_train import model_config
    from acestep_train.checkpoints.loading import arch_from_cfg

    cfg = OmegaConf.to_container(model_config(variant), resolve=True)
    size = "xl" if variant.startswith("xl-") else "2b"
    write_sharded(manifest(DIT_MANIFEST[size]), folder, "model", torch.bfloat16, seed=1)
    arch = arch_from_cfg(cfg["arch"])  # the variant YAML holds only the fields that differ from the defaults
    write_silence_latent(folder, arch.audio_acoustic_hidden_dim)
    (folder / "config.json").write_text(json.dumps(arch.to_dict(), indent=2) + "\n")  # last: marks a complete build
    return folder
