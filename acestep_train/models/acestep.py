"""The released ACE-Step 1.5 ``model.safetensors`` as one module: DiT, condition encoder, audio
(de)tokenizer and the unconditional embedding, under their released parameter names."""

from __future__ import annotations

import torch
from torch import nn

from .audio_tokenizer import AudioDetokenizer, AudioTokenizer
from .condition_encoder import ConditionEncoder
from .config import AceStepConfig
from .dit import AceStepDiT


class AceStepModel(nn.Module):
    def __init__(self, cfg: AceStepConfig):
        super().__init__()
        self.config = cfg
        self.decoder = AceStepDiT(cfg)
        self.encoder = ConditionEncoder(cfg)
        self.tokenizer = AudioTokenizer(cfg)
        self.detokenizer = AudioDetokenizer(cfg)
        self.null_condition_emb = nn.Parameter(torch.randn(1, 1, cfg.encoder_width))

    def set_gradient_checkpointing(self, enabled: bool = True, offload_activations: bool = False) -> None:
        """Per-layer activation checkpointing of the DiT (and encoder stacks), optionally offloading what
        is saved for backward to CPU."""
        self.decoder.gradient_checkpointing = enabled
        self.decoder.offload_activations = offload_activations
        for stack in (self.encoder.lyric_encoder, self.encoder.timbre_encoder):
            stack.gradient_checkpointing = enabled

    def codes_to_hints(self, indices: torch.Tensor) -> torch.Tensor:
        """Audio codes ``[B, N(, Q)]`` -> 25 Hz hint latents ``[B, 5N, 64]`` (cover / LM-code conditioning)."""
        quantized = self.tokenizer.indices_to_quantized(indices)
        return self.detokenizer(quantized.to(self.detokenizer.embed_tokens.weight.dtype))

    def latents_to_hints(self, latents: torch.Tensor, silence_latent: torch.Tensor) -> torch.Tensor:
        """tokenize -> detokenize, cropped to the input length (official ``prepare_condition``)."""
        quantized, _ = self.tokenizer.tokenize(latents, silence_latent)
        return self.detokenizer(quantized)[:, : latents.shape[1]]
