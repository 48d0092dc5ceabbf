"""Per-task context of one item (``pipeline.md`` §6): the DiT's context latents ``[src | chunk mask]``, where
sampling starts from, and what the repaint / cover-switch logic needs. This is where the heavy encoders run (VAE
encode of source, input and reference audio; audio tokenizer / detokenizer for cover hints).

* text2music: source ``silence_latent[:T]``, chunk mask 1.
* cover: source ``detok(tok(VAE(src)))`` or the decoded ``<|audio_code_N|>`` codes, chunk mask 1; after
  ``int(N·audio_cover_strength)`` steps the sampler switches the item to its text2music condition and a silence
  source.
* repaint, official: source ``VAE(src)`` with the region replaced by silence latents, chunk mask 1 in the region
  and 0 outside; the sampler injects the noised source outside the region for the first 50 % of steps and
  crossfades back to the clean source over 10 frames at the end.
* repaint, diffsynth: source ``VAE(src)·(1-m) + silence·m`` (m = ``repainting_strength`` in the ranges, 1 in the
  padding, 0 elsewhere), chunk mask 1; the sampler blends ``v = v_src·(1-m) + v·m`` on every step with
  ``v_src = (x_t - VAE(src)) / t``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from acestep_train.inference.source_audio import HOP, SAMPLE_RATE
from acestep_train.inference.request import Plan


@dataclass
class ItemContext:
    """Tensors of one item on the model device, float32, time-first (``[T, 64]`` / ``[T]``)."""

    frames: int
    src: torch.Tensor  # context source latents
    chunk: torch.Tensor  # chunk mask value per frame
    init_source: torch.Tensor | None = None  # what denoising_strength < 1 (and diffsynth add_noise) starts from
    refer: torch.Tensor | None = None  # reference latents [n, 750, 64]; None -> silence timbre
    keep: torch.Tensor | None = None  # official repaint: True where the source is kept
    clean_src: torch.Tensor | None = None  # official repaint: the source latents to inject / crossfade to
    crossfade: torch.Tensor | None = None  # official repaint: final blend weight of the generated latents
    blend: torch.Tensor | None = None  # diffsynth repaint: velocity blend mask m
    blend_src: torch.Tensor | None = None  # diffsynth repaint: the source latents of the velocity blend
    alt_src: torch.Tensor | None = None  # cover: context source after the switch to text2music


def silence_frames(silence_latent: torch.Tensor, frames: int) -> torch.Tensor:
    """``silence_latent[:frames]`` as ``[frames, 64]``, tiled by repetition past its end (official and DiffSynth)."""
    s = silence_latent.reshape(-1, silence_latent.shape[-1])
    if frames > s.shape[0]:
        s = s.repeat(-(-frames // s.shape[0]), 1)
    return s[:frames]


def model_device_dtype(bundle) -> tuple[torch.device, torch.dtype]:
    p = next(bundle.model.parameters())
    return p.device, p.dtype


def encode_audio(bundle, audio: torch.Tensor, sample: bool, generator: torch.Generator | None) -> torch.Tensor:
    """``[2, N]`` 48 kHz -> VAE latents ``[N // 1920, 64]`` float32 on the model device."""
    device, _ = model_device_dtype(bundle)
    lat = bundle.vae.encode(audio[None], sample=sample, generator=generator if sample else None)
    return lat[0].to(device=device, dtype=torch.float32)


def encode_references(bundle, plan: Plan, generator: torch.Generator | None) -> torch.Tensor | None:
    """The item's 30 s reference clips -> ``[n, 750, 64]``; None when it has none (silence timbre)."""
    if not plan.references:
        return None
    return torch.stack([encode_audio(bundle, clip, plan.vae_sample, generator) for clip in plan.references])


def _hints_from_latents(bundle, latents: torch.Tensor, crop: bool) -> torch.Tensor:
    model = bundle.model
    _, dtype = model_device_dtype(bundle)
    lat = latents[None].to(dtype)
    if crop:
        return model.latents_to_hints(lat, bundle.silence_latent)[0].float()
    quantized, _ = model.tokenizer.tokenize(lat, bundle.silence_latent)
    return model.detokenizer(quantized)[0].float()


def _soft_region_mask(keep: torch.Tensor, width: int) -> torch.Tensor:
    """1 inside repainted regions, linear ramps ``k/(width+1)`` over ``width`` frames outside each edge, else 0."""
    region = (~keep).float()
    out = region.clone()
    if width <= 0:
        return out
    t = len(region)
    inside = region.bool().tolist()
    ramp = torch.linspace(0.0, 1.0, width + 2, device=region.device)[1:-1]
    i = 0
    while i < t:
        if not inside[i]:
            i += 1
            continue
        j = i
        while j < t and inside[j]:
            j += 1
        lo = max(0, i - width)
        if lo < i:
            out[lo:i] = torch.maximum(out[lo:i], ramp[width - (i - lo):])
        hi = min(t, j + width)
        if hi > j:
            out[j:hi] = torch.maximum(out[j:hi], ramp.flip(0)[: hi - j])
        i = j
    return out


def build_context(bundle, plan: Plan) -> ItemContext:
    """Run the encoders one item needs and assemble its context (see the module table)."""
    device, _ = model_device_dtype(bundle)
    t = plan.frames
    gen = torch.Generator(plan.rand_device).manual_seed(plan.seed + 1) if plan.vae_sample else None
    silence = silence_frames(bundle.silence_latent, t).to(device=device, dtype=torch.float32)
    ones = torch.ones(t, device=device)
    refer = encode_references(bundle, plan, gen)
    ctx = ItemContext(frames=t, src=silence, chunk=ones, refer=refer)

    if plan.task == "cover":
        if plan.codes is not None:
            idx = torch.tensor(plan.codes, dtype=torch.long, device=device)[None]
            ctx.src = bundle.model.codes_to_hints(idx)[0].float()
        else:
            lat = encode_audio(bundle, plan.src_audio, plan.vae_sample, gen)
            hints = _hints_from_latents(bundle, lat, crop=plan.semantics == "official")
            ctx.src = hints
            # DiffSynth extends its noise-init source with the extra hint frames.
            ctx.init_source = torch.cat([lat, hints[lat.shape[0]:]], dim=0)
        if plan.cover_switch_step is not None:
            ctx.alt_src = silence
    elif plan.task == "repaint":
        lat = encode_audio(bundle, plan.src_audio, plan.vae_sample, gen)
        ctx.init_source = lat
        if plan.semantics == "official":
            keep = torch.ones(t, dtype=torch.bool, device=device)
            for a, b in plan.repaint_frames:
                keep[a:b] = False
            ctx.src = torch.where(keep[:, None], lat, silence)
            ctx.chunk = (~keep).float()
            ctx.keep, ctx.clean_src = keep, lat
            ctx.crossfade = _soft_region_mask(keep, plan.request.repaint_crossfade_frames)
        else:
            m = torch.zeros(t, device=device)
            for s, e in plan.repaint_ranges:
                m[int(s * SAMPLE_RATE / HOP):int(e * SAMPLE_RATE / HOP)] = plan.request.repainting_strength
            left, right = (p // HOP for p in plan.pad_samples)
            m[:left] = 1.0  # padding is always fully repainted
            if right:
                m[t - right:] = 1.0
            ctx.src = lat * (1 - m[:, None]) + silence * m[:, None]
            ctx.blend, ctx.blend_src = m, lat

    if plan.input_audio is not None:
        lat = encode_audio(bundle, plan.input_audio, plan.vae_sample, gen)[:t]
        if lat.shape[0] < t:
            lat = torch.cat([lat, lat.new_zeros(t - lat.shape[0], lat.shape[1])])
        ctx.init_source = lat
    return ctx
