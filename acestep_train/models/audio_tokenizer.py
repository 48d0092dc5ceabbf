"""Audio tokenizer (25 Hz latents -> 5 Hz FSQ codes) and detokenizer (codes -> 25 Hz hint latents).

Checkpoint prefixes ``tokenizer.`` and ``detokenizer.``; ``docs/architecture.md`` §6, ``docs/pipeline.md`` §3. The
quantiser is ``vector_quantize_pytorch.ResidualFSQ`` built with the same three arguments as the official code.
"""

from __future__ import annotations

import torch
from torch import nn
from vector_quantize_pytorch import ResidualFSQ

from acestep_train.models.condition_encoder import _encoder_stack_kwargs
from acestep_train.models.config import AceStepConfig
from acestep_train.models.layers import EncoderStack


def make_quantizer(cfg: AceStepConfig) -> ResidualFSQ:
    # The library's constructor inspects tensor values, which a meta-device build cannot; the quantiser holds
    # only ~25k parameters, so it is always built for real (its buffers are then valid after loading too).
    with torch.device("cpu"):
        return ResidualFSQ(dim=cfg.fsq_dim, levels=list(cfg.fsq_input_levels),
                       num_quantizers=cfg.fsq_input_num_quantizers)


class AttentionPooler(EncoderStack):
    """Pools each window of ``pool_window_size`` frames to one vector via a prepended learned token."""

    def __init__(self, cfg: AceStepConfig):
        super().__init__(cfg.num_attention_pooler_hidden_layers, **_encoder_stack_kwargs(cfg))
        w = cfg.encoder_width
        self.embed_tokens = nn.Linear(w, w)
        self.special_token = nn.Parameter(torch.randn(1, 1, w) * 0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t5, p, d = x.shape
        h = self.embed_tokens(x).reshape(b * t5, p, d)
        h = torch.cat([self.special_token.expand(b * t5, 1, d).to(h.dtype), h], dim=1)
        return self.run_layers(h)[:, 0].reshape(b, t5, d)


class AudioTokenizer(nn.Module):
    def __init__(self, cfg: AceStepConfig):
        super().__init__()
        self.pool_window_size = cfg.pool_window_size
        self.audio_acoustic_proj = nn.Linear(cfg.audio_acoustic_hidden_dim, cfg.encoder_width)
        self.attention_pooler = AttentionPooler(cfg)
        self.quantizer = make_quantizer(cfg)

    def tokenize(self, latents: torch.Tensor, silence_latent: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``latents [B,T,64]`` -> ``(quantized [B,ceil(T/5),W], indices [B,ceil(T/5),Q])``.

        T is padded up to a multiple of the window with the start of the silence latent, as the official code does.
        """
        b, t, d = latents.shape
        p = self.pool_window_size
        if t % p:
            pad = p - t % p
            fill = silence_latent.reshape(-1, silence_latent.shape[-1])[:pad].to(latents)
            latents = torch.cat([latents, fill[None].expand(b, pad, d)], dim=1)
        h = self.audio_acoustic_proj(latents.reshape(b, -1, p, d))
        pooled = self.attention_pooler(h)
        quantized, indices = self.quantizer(pooled)
        return quantized.to(latents.dtype), indices

    def indices_to_quantized(self, indices: torch.Tensor) -> torch.Tensor:
        """Codes ``[B, T5, Q]`` (or ``[B, T5]``) -> the quantiser's output ``[B, T5, W]``."""
        if indices.dim() == 2:
            indices = indices[..., None]
        return self.quantizer.get_output_from_indices(indices)


class AudioDetokenizer(EncoderStack):
    """5 Hz vectors -> ``embed_tokens`` -> ×5 + learned offsets -> encoder layers per group -> 64-dim latents."""

    def __init__(self, cfg: AceStepConfig):
        super().__init__(cfg.num_attention_pooler_hidden_layers, **_encoder_stack_kwargs(cfg))
        w = cfg.encoder_width
        self.pool_window_size = cfg.pool_window_size
        self.embed_tokens = nn.Linear(w, w)
        self.special_tokens = nn.Parameter(torch.randn(1, cfg.pool_window_size, w) * 0.02)
        self.proj_out = nn.Linear(w, cfg.audio_acoustic_hidden_dim)

    def forward(self, quantized: torch.Tensor) -> torch.Tensor:
        b, t5, d = quantized.shape
        p = self.pool_window_size
        h = self.embed_tokens(quantized)[:, :, None, :].expand(b, t5, p, d)
        h = (h + self.special_tokens[None].to(h.dtype)).reshape(b * t5, p, d)
        h = self.run_layers(h)
        return self.proj_out(h).reshape(b, t5 * p, -1)
