"""The released ACE-Step 1.5 ``model.safetensors`` as one module: DiT, condition encoder, audio
(de)tokenizer and the unconditional embedding, under their released parameter names."""

from __future__ import annotations

import torch
from torch import nn

from acestep_train.models.audio_tokenizer import AudioDetokenizer, AudioTokenizer
from acestep_train.models.condition_encoder import ConditionEncoder
from acestep_train.models.config import AceStepConfig
from acestep_train.models.dit import AceStepDiT


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

    def encode_conditions(
        self,
        text_hidden: torch.Tensor,
        text_mask: torch.Tensor,
        lyric_embeds: torch.Tensor,
        lyric_mask: torch.Tensor,
        silence_latent: torch.Tensor,
        refer_latents: torch.Tensor | None = None,
        refer_order: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The packed condition sequence ``[B, L, W]`` and its mask, as training and sampling both build it.

        Without references every item gets ``silence_latent[:timbre_fix_frame]`` as its timbre input (official
        inference; literal zeros are out of distribution). ``refer_latents [N, F, 64]`` with ``refer_order [N]``
        packs N references over the batch.
        """
        b = text_hidden.shape[0]
        if refer_latents is None:
            # The silence reference is the same for every item and step: encode it once (not B times per step).
            timbre = self.silence_timbre(silence_latent, text_hidden.device, text_hidden.dtype)
            order = torch.arange(b, device=text_hidden.device)
            return self.encoder(text_hidden, text_mask, lyric_embeds, lyric_mask, None, order,
                                timbre_packed=timbre.expand(b, -1))
        if refer_order is None:
            refer_order = torch.arange(refer_latents.shape[0], device=text_hidden.device)
        return self.encoder(text_hidden, text_mask, lyric_embeds, lyric_mask, refer_latents, refer_order)

    def silence_timbre(self, silence_latent: torch.Tensor, device, dtype) -> torch.Tensor:
        """Timbre-encoder output ``[1, W]`` for ``silence_latent[:timbre_fix_frame]``, cached until the timbre
        encoder's weights or the silence latent change (or gradients through the encoder are wanted)."""
        enc = self.encoder.timbre_encoder
        w = enc.embed_tokens.weight
        key = (silence_latent.data_ptr(), silence_latent._version, w.data_ptr(), w._version, str(device), dtype)
        trainable = torch.is_grad_enabled() and any(p.requires_grad for p in enc.parameters())
        cached = getattr(self, "_silence_timbre", None)
        if not trainable and cached is not None and cached[0] == key:
            return cached[1]
        n = self.config.timbre_fix_frame
        sil = silence_latent.reshape(1, -1, silence_latent.shape[-1])
        if sil.shape[1] < n:
            sil = sil.repeat(1, -(-n // sil.shape[1]), 1)
        out = enc(sil[:, :n].to(device=device, dtype=dtype))
        if not trainable:
            self._silence_timbre = (key, out.detach())
        return out

    def codes_to_hints(self, indices: torch.Tensor) -> torch.Tensor:
        """Audio codes ``[B, N(, Q)]`` -> 25 Hz hint latents ``[B, 5N, 64]`` (cover / LM-code conditioning)."""
        quantized = self.tokenizer.indices_to_quantized(indices)
        return self.detokenizer(quantized.to(self.detokenizer.embed_tokens.weight.dtype))

    def latents_to_hints(self, latents: torch.Tensor, silence_latent: torch.Tensor) -> torch.Tensor:
        """tokenize -> detokenize, cropped to the input length (official ``prepare_condition``)."""
        quantized, _ = self.tokenizer.tokenize(latents, silence_latent)
        return self.detokenizer(quantized)[:, : latents.shape[1]]
