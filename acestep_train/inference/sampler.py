"""The one sampler used by ``generate`` and by the training validation callback (pure PyTorch).

    >>> from acestep_train import load_model
    >>> from acestep_train.inference import GenerationRequest, Sampler
    >>> sampler = Sampler(load_model("tiny"))
    >>> out = sampler([GenerationRequest("lo-fi piano", duration=10, seed=1),
    ...                GenerationRequest("techno", duration=12, seed=2)])
    >>> out.audio.shape, out.params[1]["seed"]            # [2, 2, 576000], 2

How a call runs:

1. every request is checked and resolved (:func:`~.request.plan_request`) before any model runs;
2. requests that share steps, t values and guidance are sampled together as one batch (different lengths are
   padded to the longest and hidden with the DiT's attention masks; equal lengths use no mask);
3. per item: encoders run (:func:`~.tasks.build_context`), the condition sequence is encoded
   (:func:`~.conditions.encode_conditions`), noise is drawn from ``torch.Generator(rand_device).manual_seed(seed)``;
4. Euler steps over the schedule; with guidance, conditional and unconditional rows go through ONE DiT forward;
   the cross-attention K/V of the (constant) condition are computed once, and again only when a cover item switches
   to its text2music condition;
5. each item's latents are VAE-decoded at its own length (official: 512-frame tiles with 64 frames of discarded
   context per side; diffsynth: one pass), anti-clipped and peak-normalised to -1 dBFS.

Latents are kept in float32 between steps and cast to the DiT dtype for each forward; the DiT sees
``t`` in its dtype (bf16: ``bf16(bf16(t)·1000)`` inside the timestep embedding, the official rounding).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from tqdm.auto import tqdm

from acestep_train.inference.source_audio import HOP, SAMPLE_RATE, normalize_output
from acestep_train.inference.conditions import encode_conditions
from acestep_train.inference.request import GenerationRequest, Plan, RequestError, plan_request
from acestep_train.inference.tasks import ItemContext, build_context, model_device_dtype


@dataclass
class GenerationResult:
    """Generated tracks, in request order."""

    audio: torch.Tensor  # [B, 2, N] float32 CPU, 48 kHz, zero past each track's length
    latents: torch.Tensor  # [B, T, 64] float32 CPU, the DiT output before VAE decode, zero past each length
    lengths: list[int]  # samples of each track
    frames: list[int]  # latent frames of each track
    params: list[dict[str, Any]]  # every resolved parameter of each item (seed, steps, schedule, guidance, ...)
    sample_rate: int = SAMPLE_RATE

    def tracks(self) -> list[torch.Tensor]:
        """Each track ``[2, N_i]`` without padding."""
        return [a[:, :n] for a, n in zip(self.audio, self.lengths)]


@dataclass
class _Batch:
    """Padded per-item tensors of one denoising loop."""

    plans: list[Plan]
    ctxs: list[ItemContext]
    frames: list[int]
    frame_mask: torch.Tensor | None  # [B, T] bool, None when all items have the same length
    src: torch.Tensor  # [B, T, 64]
    chunk: torch.Tensor  # [B, T, 64]
    noise: torch.Tensor  # [B, T, 64] float32
    extras: dict[str, torch.Tensor] = field(default_factory=dict)


def _pad_stack(rows: Sequence[torch.Tensor], length: int) -> torch.Tensor:
    out = rows[0].new_zeros((len(rows), length, *rows[0].shape[1:]))
    for i, r in enumerate(rows):
        out[i, : r.shape[0]] = r
    return out


def _pad_condition(enc: torch.Tensor, mask: torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    extra = length - enc.shape[1]
    if extra <= 0:
        return enc, mask
    return (torch.cat([enc, enc.new_zeros(enc.shape[0], extra, enc.shape[2])], 1),
            torch.cat([mask, mask.new_zeros(mask.shape[0], extra)], 1))


def _mask_or_none(mask: torch.Tensor) -> torch.Tensor | None:
    return None if bool(mask.all()) else mask


class Sampler:
    """Generate audio from :class:`GenerationRequest` s with one loaded :class:`~acestep_train.checkpoints.loading.ModelBundle`.

    ``tiled_decode``: decode long latents in 512-frame windows with 64 frames of discarded context per side
    (official default) or in one pass (DiffSynth default); None follows each request's ``semantics``. Outputs up to
    512 frames (20.48 s) are decoded in one pass either way.
    """

    def __init__(self, bundle, *, tiled_decode: bool | None = None):
        self.bundle = bundle
        self.tiled_decode = tiled_decode

    def plan(self, requests: GenerationRequest | Sequence[GenerationRequest]) -> list[Plan]:
        """Check and resolve requests without running any model (raises :class:`RequestError`)."""
        reqs = [requests] if isinstance(requests, GenerationRequest) else list(requests)
        if not reqs:
            raise RequestError("no generation requests given")
        return [plan_request(self.bundle, r, i) for i, r in enumerate(reqs)]

    @torch.no_grad()
    def __call__(self, requests: GenerationRequest | Sequence[GenerationRequest], progress: bool = True
                 ) -> GenerationResult:
        plans = self.plan(requests)
        groups: dict[tuple, list[Plan]] = {}
        for p in plans:
            groups.setdefault(p.loop_key, []).append(p)
        model = self.bundle.model
        was_training = model.training
        model.eval()
        try:
            latents: dict[int, torch.Tensor] = {}
            for group in groups.values():
                out = self._denoise(group, progress)
                for i, p in enumerate(group):
                    latents[p.index] = out[i, : p.frames]
            audio = self._decode(plans, latents)
        finally:
            model.train(was_training)
        frames = [p.frames for p in plans]
        t_max = max(frames)
        return GenerationResult(
            audio=_pad_stack([audio[p.index].transpose(0, 1) for p in plans], t_max * HOP).transpose(1, 2).contiguous(),
            latents=_pad_stack([latents[p.index].cpu() for p in plans], t_max),
            lengths=[f * HOP for f in frames], frames=frames, params=[p.params for p in plans])

    # ---- one batch ------------------------------------------------------------------------------------------------

    def _prepare(self, plans: list[Plan]) -> _Batch:
        device, dtype = model_device_dtype(self.bundle)
        ctxs = [build_context(self.bundle, p) for p in plans]
        frames = [c.frames for c in ctxs]
        t = max(frames)
        frame_mask = None
        if len(set(frames)) > 1:
            frame_mask = torch.arange(t, device=device)[None] < torch.tensor(frames, device=device)[:, None]
        noise = []
        dim = self.bundle.config.audio_acoustic_hidden_dim
        for p in plans:
            g = torch.Generator(p.rand_device).manual_seed(p.seed)
            n = torch.randn((1, p.frames, dim), generator=g, device=p.rand_device, dtype=dtype)
            noise.append(n[0].to(device=device, dtype=torch.float32))
        src = _pad_stack([c.src for c in ctxs], t)
        chunk = _pad_stack([c.chunk for c in ctxs], t)[..., None].expand(-1, -1, src.shape[-1])
        return _Batch(plans, ctxs, frames, frame_mask, src, chunk, _pad_stack(noise, t))

    def _initial_latents(self, b: _Batch) -> torch.Tensor:
        x = b.noise.clone()
        for i, (p, c) in enumerate(zip(b.plans, b.ctxs)):
            t0 = p.schedule.timesteps[0]
            n = b.noise[i, : p.frames]
            if p.semantics == "diffsynth" and c.init_source is not None:
                x[i, : p.frames] = (1 - t0) * c.init_source + t0 * n  # FlowMatchScheduler.add_noise
            elif p.semantics == "official" and p.request.denoising_strength < 1.0:
                x[i, : p.frames] = t0 * n + (1 - t0) * c.init_source  # cover_noise_strength init
        return x

    def _conditions(self, b: _Batch, task: str | None, rows: list[int]):
        if not rows:
            return None, None
        return encode_conditions(self.bundle, [b.plans[i].condition_fields(task) for i in rows],
                                 [b.ctxs[i].refer for i in rows])

    @staticmethod
    def _switch_rows(b: _Batch, due: list[int], switch_rows: list[int], cond, alt):
        """Give the ``due`` cover items their text2music condition rows and silence context source."""
        width = max(cond[0].shape[1], alt[0].shape[1])
        enc, enc_mask = _pad_condition(*cond, width)
        alt_enc, alt_mask = _pad_condition(*alt, width)
        enc, enc_mask, src = enc.clone(), enc_mask.clone(), b.src.clone()
        for i in due:
            j = switch_rows.index(i)
            enc[i], enc_mask[i] = alt_enc[j], alt_mask[j]
            src[i, : b.frames[i]] = b.ctxs[i].alt_src
        b.src = src
        return enc, enc_mask

    def _denoise(self, plans: list[Plan], progress: bool) -> torch.Tensor:
        model = self.bundle.model
        dit = model.decoder
        device, dtype = model_device_dtype(self.bundle)
        b = self._prepare(plans)
        n_items = len(plans)
        schedule, guidance = plans[0].schedule, plans[0].guidance
        x = self._initial_latents(b)

        enc, enc_mask = self._conditions(b, None, list(range(n_items)))
        switch_rows = [i for i, p in enumerate(plans) if p.cover_switch_step is not None]
        alt_enc, alt_mask = self._conditions(b, "text2music", switch_rows)
        switched: set[int] = set()

        blend = blend_src = None
        if any(c.blend is not None for c in b.ctxs):
            blend = _pad_stack([c.blend if c.blend is not None else torch.ones(c.frames, device=device)
                                for c in b.ctxs], b.src.shape[1])[..., None]
            blend_src = _pad_stack([c.blend_src if c.blend_src is not None else torch.zeros_like(c.src)
                                    for c in b.ctxs], b.src.shape[1])
        inject = [(i, round(p.request.repaint_injection_ratio * schedule.steps))
                  for i, (p, c) in enumerate(zip(plans, b.ctxs)) if c.keep is not None]

        momentum = guidance.new_state()
        null = model.null_condition_emb
        kv = None
        context = torch.cat([b.src, b.chunk], dim=-1).to(dtype)
        deltas = schedule.deltas()
        bar = tqdm(total=schedule.steps, disable=not progress, desc=f"sampling {n_items} item(s)", leave=False)
        for step, (t, dt) in enumerate(zip(schedule.timesteps, deltas)):
            due = [i for i in switch_rows if i not in switched and step >= plans[i].cover_switch_step]
            if due:  # cover -> text2music: new condition rows, silence context, fresh cross-attention K/V
                enc, enc_mask = self._switch_rows(b, due, switch_rows, (enc, enc_mask), (alt_enc, alt_mask))
                switched.update(due)
                context = torch.cat([b.src, b.chunk], dim=-1).to(dtype)
                kv = None
            if kv is None:
                rows = torch.cat([enc, null.expand_as(enc).to(enc.dtype)]) if guidance.enabled else enc
                kv = dit.cross_kv(rows)
            cond_mask = _mask_or_none(enc_mask)
            use_guidance = guidance.active(t)
            x_in, ctx_in, fmask, emask, kv_in = x.to(dtype), context, b.frame_mask, cond_mask, kv
            if use_guidance:
                x_in, ctx_in = torch.cat([x_in, x_in]), torch.cat([ctx_in, ctx_in])
                fmask = None if fmask is None else torch.cat([fmask, fmask])
                emask = None if emask is None else torch.cat([emask, emask])
            elif guidance.enabled:
                kv_in = [(k[:n_items], v[:n_items]) for k, v in kv]
            tt = torch.full((x_in.shape[0],), t, dtype=dtype, device=device)
            v = dit(x_in, tt, tt, None, ctx_in, attention_mask=fmask, encoder_attention_mask=emask,
                    cross_kv=kv_in).float()
            if use_guidance:
                v_cond, v_uncond = v.chunk(2)
                if b.frame_mask is not None:  # padded frames must not enter APG's norms over time
                    v_cond = v_cond * b.frame_mask[..., None]
                    v_uncond = v_uncond * b.frame_mask[..., None]
                v = guidance.combine(v_cond, v_uncond, x_t=x, t=t, state=momentum)
            if blend is not None:  # diffsynth repaint: follow the noised source outside the ranges
                v = ((x - blend_src) / t) * (1 - blend) + v * blend
            x = x + v * dt
            if b.frame_mask is not None:
                x = x * b.frame_mask[..., None]
            t_next = schedule.timesteps[step + 1] if step + 1 < schedule.steps else 0.0
            for i, n_inject in inject:
                if step < n_inject:  # official repaint: keep the source (noised to t_next) outside the region
                    c, f = b.ctxs[i], b.frames[i]
                    kept = t_next * b.noise[i, :f] + (1 - t_next) * c.clean_src
                    x[i, :f] = torch.where(c.keep[:, None], kept, x[i, :f])
            bar.update()
        bar.close()
        for i, c in enumerate(b.ctxs):
            if c.crossfade is not None:
                f, w = c.frames, c.crossfade[:, None]
                x[i, :f] = w * x[i, :f] + (1 - w) * c.clean_src
        return x

    # ---- decode ---------------------------------------------------------------------------------------------------

    def _decode(self, plans: list[Plan], latents: dict[int, torch.Tensor]) -> dict[int, torch.Tensor]:
        """VAE-decode each item at its own length (equal lengths together), then anti-clip + -1 dBFS per track."""
        groups: dict[tuple[int, bool], list[int]] = {}
        for p in plans:
            tile = (p.semantics == "official") if self.tiled_decode is None else self.tiled_decode
            groups.setdefault((p.frames, tile), []).append(p.index)
        out = {}
        for (_, tile), idx in groups.items():
            z = torch.stack([latents[i] for i in idx])
            audio = self.bundle.vae.decode(z, tile=tile).float().cpu()
            for i, a in zip(idx, audio):
                out[i] = normalize_output(a)
        return out
