"""The condition sequence the DiT cross-attends to, built the same way for sampling and for training.

Per item: caption prompt (instruction, caption, metas) and lyric prompt through
:func:`acestep_train.conditioning.text.encode_text_conditions`, timbre from reference latents (``[n, 750, 64]`` per item;
``silence_latent[:750]`` when there is none, as both upstream pipelines do), then ``model.encoder`` packs
``[lyrics | timbre | caption | padding]`` (``docs/architecture.md`` §5).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from acestep_train.conditioning.text import encode_text_conditions
from acestep_train.conditioning.tasks import silence_frames
from acestep_train.inference.request import GenerationRequest, plan_request
from acestep_train.inference.tasks import dit_device_dtype, encode_references, module_device_dtype


def encode_conditions(bundle, items: Sequence[Mapping], refer: Sequence[torch.Tensor | None]
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """``items``: per row ``caption, lyrics, bpm, keyscale, timesignature, duration, vocal_language, task``;
    ``refer``: per row reference latents ``[n, frames, 64]`` or None. Returns ``(encoder_hidden_states [B, L, D],
    encoder_mask [B, L] bool)`` in the condition encoder's dtype and device."""
    if len(items) != len(refer):
        raise ValueError(f"{len(items)} condition rows but {len(refer)} reference entries")
    # The DiT's device (low-VRAM offload keeps it as the anchor), the condition encoder's dtype.
    device, _ = dit_device_dtype(bundle)
    _, dtype = module_device_dtype(bundle.model.encoder)
    col = {k: [it[k] for it in items] for k in ("caption", "lyrics", "bpm", "keyscale", "timesignature", "duration",
                                               "vocal_language", "task")}
    text = encode_text_conditions(bundle.text_encoder, col["caption"], col["lyrics"], bpm=col["bpm"],
                                  keyscale=col["keyscale"], timesignature=col["timesignature"],
                                  duration=col["duration"], vocal_language=col["vocal_language"], task=col["task"])
    text = text.to(device=device, dtype=dtype)
    refer_latents = refer_order = None
    if any(r is not None for r in refer):
        default = silence_frames(bundle.silence_latent, bundle.config.timbre_fix_frame)[None]
        packed, order = [], []
        for i, lat in enumerate(refer):
            lat = default if lat is None else lat
            if lat.dim() != 3 or lat.shape[0] == 0:
                raise ValueError(f"reference latents of row {i} must be [n >= 1, frames, dim], got {list(lat.shape)}")
            packed.append(lat.to(device=device, dtype=dtype))
            order += [i] * lat.shape[0]
        refer_latents, refer_order = torch.cat(packed), torch.tensor(order, device=device)
    # The model method holds the silence-timbre default, shared with the training step.
    return bundle.model.encode_conditions(text.text_hidden, text.text_mask, text.lyric_embeds, text.lyric_mask,
                                          bundle.silence_latent, refer_latents, refer_order)


def build_conditions(bundle, requests: GenerationRequest | Sequence[GenerationRequest], *,
                     refer_latents: Sequence[torch.Tensor | None] | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(encoder_hidden_states, encoder_mask)`` of requests, exactly as :class:`Sampler` conditions the DiT.

    Training reuses this so that prompts, metas, instruction and timbre cannot differ from inference. Reference
    audio in the requests is VAE-encoded here; ``refer_latents`` (one entry per request, ``[n, 750, 64]`` or None)
    passes precomputed ones instead. Runs with autograd as the caller set it (the text encoder is always frozen).
    """
    reqs = [requests] if isinstance(requests, GenerationRequest) else list(requests)
    if not reqs:
        raise ValueError("build_conditions: no requests")
    plans = [plan_request(bundle, r, i) for i, r in enumerate(reqs)]
    if refer_latents is None:
        refer = [encode_references(bundle, p) for p in plans]
    else:
        refer = list(refer_latents)
    return encode_conditions(bundle, [p.condition_fields() for p in plans], refer)
