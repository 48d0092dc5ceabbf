"""Audio VAE: diffusers ``AutoencoderOobleck`` plus ACE-Step's posterior sampling and overlap-discard tiling.

Facts (``docs/pipeline.md`` §2): 48 kHz stereo in, 25 latent frames/s out (hop 1920), 64-dim latents, no scaling
factor or shift. ``encode`` samples the posterior ``mean + (softplus(scale) + 1e-4) * eps``. Long inputs are
processed in chunks whose overlapping borders are computed and then thrown away (overlap-discard), which is what
the official pipeline does (30 s / 2 s for encode, 512 / 64 frames for decode).

The diffusers module is kept as ``self.model`` so that ``self.model.state_dict()`` has exactly the released
``vae/diffusion_pytorch_model.safetensors`` key names (legacy weight norm ``weight_g`` / ``weight_v``).
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from diffusers import AutoencoderOobleck
from torch import nn

# The released vae/config.json (docs/pipeline.md §2.1). Keys starting with "_" are diffusers metadata.
RELEASED_VAE_CONFIG: dict[str, Any] = {
    "_class_name": "AutoencoderOobleck",
    "_diffusers_version": "0.34.0",
    "audio_channels": 2,
    "channel_multiples": [1, 2, 4, 8, 16],
    "decoder_channels": 128,
    "decoder_input_channels": 64,
    "downsampling_ratios": [2, 4, 4, 6, 10],
    "encoder_hidden_size": 128,
    "sampling_rate": 48000,
}

# Same class, hop, rate and latent size as the released VAE, but narrow. ``encoder_hidden_size`` cannot shrink:
# the encoder's last conv emits ``encoder_hidden_size`` channels that are split into 64 mean + 64 scale, and the
# same number is the width of the first (full-sample-rate) encoder block. So the tiny encoder still costs ~2 s of
# CPU per second of audio (one thread); the decoder and deeper encoder blocks are what we shrink.
# The last multiple is 2 (not 1) so that tests see the per-block width mapping (reversed in the decoder).
TINY_VAE_CONFIG: dict[str, Any] = {
    "audio_channels": 2,
    "channel_multiples": [1, 1, 1, 1, 2],
    "decoder_channels": 8,
    "decoder_input_channels": 64,
    "downsampling_ratios": [2, 4, 4, 6, 10],
    "encoder_hidden_size": 128,
    "sampling_rate": 48000,
}

# Official tiling defaults (docs/pipeline.md §2.6).
DEFAULT_ENCODE_CHUNK_SAMPLES = 1_440_000  # 30 s at 48 kHz
DEFAULT_ENCODE_OVERLAP_SAMPLES = 96_000  # 2 s at 48 kHz, each side
DEFAULT_DECODE_CHUNK_FRAMES = 512
DEFAULT_DECODE_OVERLAP_FRAMES = 64  # each side

WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
CONFIG_NAME = "config.json"


def _build_oobleck(cfg: dict[str, Any]) -> AutoencoderOobleck:
    cfg = dict(cfg)
    class_name = cfg.pop("_class_name", "AutoencoderOobleck")
    if class_name != "AutoencoderOobleck":
        raise ValueError(f"VAE config: _class_name is {class_name!r}, expected 'AutoencoderOobleck'")
    kwargs = {k: v for k, v in cfg.items() if not k.startswith("_")}
    # diffusers' own defaults are Stable Audio's (44.1 kHz, other ratios), so every field must be explicit.
    required = {k for k in RELEASED_VAE_CONFIG if not k.startswith("_")}
    missing = sorted(required - kwargs.keys())
    unknown = sorted(kwargs.keys() - required)
    if missing or unknown:
        raise ValueError(
            f"VAE config: missing keys {missing}, unknown keys {unknown}; expected exactly {sorted(required)}"
        )
    with warnings.catch_warnings():
        # The legacy torch.nn.utils.weight_norm is deprecated but is what gives the released weight_g/weight_v keys.
        warnings.filterwarnings("ignore", message=".*weight_norm.*deprecated", category=FutureWarning)
        return AutoencoderOobleck(**kwargs)


def _plan_tiles(total: int, chunk: int, overlap: int) -> list[tuple[int, int, int, int]]:
    """Split ``[0, total)`` into cores of ``chunk - 2*overlap`` units, each read with ``overlap`` context per side.

    Returns ``(window_start, window_end, core_start, core_end)`` tuples (clipped to the signal).
    """
    stride = chunk - 2 * overlap
    tiles = []
    for core_start in range(0, total, stride):
        core_end = min(core_start + stride, total)
        tiles.append((max(0, core_start - overlap), min(total, core_end + overlap), core_start, core_end))
    return tiles


def _check_tiling(chunk: int, overlap: int, what: str) -> None:
    if overlap < 0 or chunk - 2 * overlap <= 0:
        raise ValueError(f"{what}: chunk ({chunk}) must be greater than 2 * overlap ({overlap}) and overlap >= 0")


class AudioVAE(nn.Module):
    """ACE-Step audio VAE. ``encode``: ``[B, 2, N]`` audio → ``[B, N // 1920, 64]`` latents; ``decode``: inverse."""

    def __init__(
        self,
        model: AutoencoderOobleck,
        *,
        encode_chunk_samples: int = DEFAULT_ENCODE_CHUNK_SAMPLES,
        encode_overlap_samples: int = DEFAULT_ENCODE_OVERLAP_SAMPLES,
        decode_chunk_frames: int = DEFAULT_DECODE_CHUNK_FRAMES,
        decode_overlap_frames: int = DEFAULT_DECODE_OVERLAP_FRAMES,
    ):
        super().__init__()
        if not isinstance(model, AutoencoderOobleck):
            raise TypeError(f"AudioVAE wraps a diffusers AutoencoderOobleck, got {type(model).__name__}")
        cfg = model.config
        # The posterior splits the encoder output in half; the decoder must take that half as input.
        if cfg.encoder_hidden_size != 2 * cfg.decoder_input_channels:
            raise ValueError(
                f"VAE config: encoder_hidden_size ({cfg.encoder_hidden_size}) must be 2 * decoder_input_channels "
                f"({cfg.decoder_input_channels}) because the encoder output is split into mean and scale"
            )
        self.model = model
        self.encode_chunk_samples = encode_chunk_samples
        self.encode_overlap_samples = encode_overlap_samples
        self.decode_chunk_frames = decode_chunk_frames
        self.decode_overlap_frames = decode_overlap_frames

    # ------------------------------------------------------------------ construction / IO
    @classmethod
    def from_config(cls, cfg: dict[str, Any], *, dtype: torch.dtype = torch.float32, **tiling: int) -> "AudioVAE":
        """Randomly initialised VAE from a ``config.json``-style dict (e.g. ``RELEASED_VAE_CONFIG``)."""
        model = _build_oobleck(cfg)
        # Plain nn.Module.to: diffusers' override only adds a notice about fp32-pinned modules, and Oobleck has none.
        nn.Module.to(model, dtype=dtype)
        return cls(model, **tiling)

    @classmethod
    def from_pretrained(
        cls, folder: str | Path, dtype: torch.dtype = torch.float32, **tiling: int
    ) -> "AudioVAE":
        """Load a diffusers VAE folder (``config.json`` + ``diffusion_pytorch_model.safetensors``), e.g. the released
        ``vae/``. Every key must match: missing, unexpected or mis-shaped tensors raise."""
        folder = Path(folder)
        if not folder.is_dir():
            raise FileNotFoundError(f"VAE folder not found: {folder}")
        for name in (CONFIG_NAME, WEIGHTS_NAME):
            if not (folder / name).is_file():
                raise FileNotFoundError(f"VAE folder {folder} has no {name} (expected {folder / name})")
        try:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=".*weight_norm.*deprecated", category=FutureWarning)
                model, info = AutoencoderOobleck.from_pretrained(
                    str(folder), torch_dtype=dtype, output_loading_info=True, use_safetensors=True
                )
        except Exception as e:  # noqa: BLE001 - re-raised with the file named; the original is chained
            raise RuntimeError(f"could not load VAE from {folder / WEIGHTS_NAME} ({folder / CONFIG_NAME}): {e}") from e
        problems = {k: v for k, v in info.items() if k in ("missing_keys", "unexpected_keys", "mismatched_keys") and v}
        if problems:
            raise RuntimeError(f"VAE weights {folder / WEIGHTS_NAME} do not match the config: {problems}")
        return cls(model, **tiling)

    def save_pretrained(self, folder: str | Path) -> None:
        """Write ``config.json`` + ``diffusion_pytorch_model.safetensors`` (loadable by ``from_pretrained``)."""
        self.model.save_pretrained(str(folder), safe_serialization=True)

    # ------------------------------------------------------------------ properties
    @property
    def hop_length(self) -> int:
        return int(math.prod(self.model.config.downsampling_ratios))

    @property
    def sample_rate(self) -> int:
        return int(self.model.config.sampling_rate)

    @property
    def latent_dim(self) -> int:
        return int(self.model.config.decoder_input_channels)

    @property
    def audio_channels(self) -> int:
        return int(self.model.config.audio_channels)

    def _param(self) -> torch.Tensor:
        return next(self.model.parameters())

    # ------------------------------------------------------------------ encode
    def encode(
        self,
        audio: torch.Tensor,
        *,
        sample: bool = True,
        generator: torch.Generator | None = None,
        chunk_samples: int | None = None,
        overlap_samples: int | None = None,
    ) -> torch.Tensor:
        """Audio ``[B, C, N]`` (48 kHz, float in [-1, 1]) → latents ``[B, N // hop, latent_dim]``.

        ``sample=True`` draws from the posterior (as both official and DiffSynth pipelines do); ``generator`` makes
        the draw reproducible (its device may differ from the model's). Inputs longer than ``chunk_samples`` are
        encoded in overlapping chunks; chunk and overlap must be multiples of ``hop_length``. Output dtype/device
        follow the VAE parameters. Runs with autograd as the caller set it (wrap in ``torch.no_grad()`` when frozen).
        """
        chunk = self.encode_chunk_samples if chunk_samples is None else chunk_samples
        overlap = self.encode_overlap_samples if overlap_samples is None else overlap_samples
        hop = self.hop_length
        if audio.dim() != 3 or audio.shape[1] != self.audio_channels:
            raise ValueError(
                f"AudioVAE.encode expects audio of shape [B, {self.audio_channels}, N], got {tuple(audio.shape)}"
            )
        if audio.shape[-1] < hop:
            raise ValueError(f"AudioVAE.encode needs at least {hop} samples (one latent frame), got {audio.shape[-1]}")
        _check_tiling(chunk, overlap, "AudioVAE.encode tiling")
        if chunk % hop or overlap % hop:
            # Frame-aligned windows make the kept frames sit exactly where a one-pass encode puts them.
            raise ValueError(f"AudioVAE.encode: chunk ({chunk}) and overlap ({overlap}) must be multiples of {hop}")
        p = self._param()
        audio = audio.to(device=p.device, dtype=p.dtype)

        n = audio.shape[-1]
        if n <= chunk:
            h = self.model.encoder(audio)
        else:
            frames = n // hop
            parts = []
            tiles = _plan_tiles(frames, chunk // hop, overlap // hop)
            for ws, we, cs, ce in tiles:
                # Windows that reach the last frame also take the < hop trailing samples, as the one-pass encode
                # does: they are within the receptive field of the last ~7 frames.
                end = n if we == frames else we * hop
                h_tile = self.model.encoder(audio[:, :, ws * hop : end])
                parts.append(h_tile[:, :, cs - ws : ce - ws])
            h = torch.cat(parts, dim=-1)
        if h.shape[-1] != n // hop:
            raise RuntimeError(f"VAE encoder returned {h.shape[-1]} frames for {n} samples, expected {n // hop}")

        mean, scale = h.float().chunk(2, dim=1)
        if sample:
            std = F.softplus(scale) + 1e-4
            gen_device = generator.device if generator is not None else mean.device
            eps = torch.randn(mean.shape, generator=generator, device=gen_device, dtype=mean.dtype).to(mean.device)
            z = mean + std * eps
        else:
            z = mean
        return z.to(h.dtype).transpose(1, 2)

    # ------------------------------------------------------------------ decode
    def decode(
        self,
        latents: torch.Tensor,
        *,
        tile: bool = True,
        chunk_frames: int | None = None,
        overlap_frames: int | None = None,
    ) -> torch.Tensor:
        """Latents ``[B, T, latent_dim]`` → audio ``[B, C, hop * T]``.

        With ``tile=True`` and ``T > chunk_frames`` the latents are decoded in windows of at most ``chunk_frames``
        with ``overlap_frames`` of discarded context on each side (official default 512 / 64).
        """
        chunk = self.decode_chunk_frames if chunk_frames is None else chunk_frames
        overlap = self.decode_overlap_frames if overlap_frames is None else overlap_frames
        if latents.dim() != 3 or latents.shape[-1] != self.latent_dim:
            raise ValueError(
                f"AudioVAE.decode expects latents of shape [B, T, {self.latent_dim}], got {tuple(latents.shape)}"
            )
        if latents.shape[1] == 0:
            raise ValueError("AudioVAE.decode got latents with T = 0 frames")
        _check_tiling(chunk, overlap, "AudioVAE.decode tiling")
        p = self._param()
        z = latents.to(device=p.device, dtype=p.dtype).transpose(1, 2)
        hop = self.hop_length

        frames = z.shape[-1]
        if not tile or frames <= chunk:
            audio = self.model.decoder(z)
        else:
            parts = []
            for ws, we, cs, ce in _plan_tiles(frames, chunk, overlap):
                a = self.model.decoder(z[:, :, ws:we])
                parts.append(a[:, :, (cs - ws) * hop : (ce - ws) * hop])
            audio = torch.cat(parts, dim=-1)
        if audio.shape[-1] != frames * hop:
            raise RuntimeError(
                f"VAE decoder returned {audio.shape[-1]} samples for {frames} frames, expected {frames * hop}"
            )
        return audio
