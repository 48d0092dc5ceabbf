"""The one contract between data and model: what a training batch holds.

Everything the DiT step needs is precomputed by the preprocessing pass (VAE latents, caption hidden states,
lyric token embeddings), so training touches only the DiT and the condition encoder. Padding is explicit:
every padded tensor travels with a boolean mask (True = valid).
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch


@dataclass
class Batch:
    """A padded batch of cached samples.

    Shapes: B items, T latent frames (25 Hz), Lt caption tokens, Ll lyric tokens, D = 64 latent channels,
    E = 1024 text-encoder width.
    """

    latents: torch.Tensor  # [B, T, D] clean VAE latents x0 (zero on padded frames)
    latent_mask: torch.Tensor  # [B, T] bool, True on valid frames
    text_hidden: torch.Tensor  # [B, Lt, E] caption last_hidden_state (zero on padding)
    text_mask: torch.Tensor  # [B, Lt] bool
    lyric_embeds: torch.Tensor  # [B, Ll, E] lyric token embeddings (embed_tokens only)
    lyric_mask: torch.Tensor  # [B, Ll] bool
    ids: list[str]  # sample ids (for error messages: "row 12 of metadata.csv")
    refer_latents: torch.Tensor | None = None  # [B, 750, D] timbre reference, None -> silence latent

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> "Batch":
        out = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, torch.Tensor):
                v = v.to(device)
                if dtype is not None and v.is_floating_point():
                    v = v.to(dtype)
            out[f.name] = v
        return Batch(**out)

    def __len__(self) -> int:
        return self.latents.shape[0]
