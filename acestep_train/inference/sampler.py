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
3. per item: the plan's task object runs the encoders it needs (:func:`~.tasks.prepare_item`) and returns its
   context, start point and per-step hooks; the condition sequence is encoded
   (:func:`~.conditions.encode_conditions`), noise is drawn from ``torch.Generator(rand_device).manual_seed(seed)``;
4. Euler steps over the schedule, with no task branches (each item's hooks adjust its own frames); with guidance,
   conditional and unconditional rows go through ONE DiT forward; the cross-attention K/V of the (constant)
   condition are computed once, and again only when an item switches condition (cover -> text2music);
5. each item's latents are VAE-decoded at its own length (official: 512-frame tiles with 64 frames of discarded
   context per side; diffsynth: one pass), anti-clipped and peak-normalised to -1 dBFS.

Latents are kept in float32 between steps and cast to the DiT dtype for each forward (the condition encoder gets
its inputs in its own dtype: the two differ when only the DiT was upcast for full fine-tuning); the DiT sees
``t`` in its dtype (bf16: ``bf16(bf16(t)·1000)`` inside the timestep embedding, the official rounding).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from tqdm.auto import tqdm

from acestep_train.conditioning.tasks import TaskItem, context_latents
from acestep_train.inference.conditions import encode_conditions
from acestep_train.inference.request import GenerationRequest, Plan, RequestError, plan_request
from acestep_train.inference.source_audio import HOP, SAMPLE_RATE, normalize_output
from acestep_train.inference.tasks import dit_device_dtype, prepare_item


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
    items: list[TaskItem]
    frames: list[int]
    frame_mask: torch.Tensor | None  # [B, T] bool, None when all items have the same length
    src: torch.Tensor  # [B, T, 64]
    chunk: torch.Tensor  # [B, T]
    noise: torch.Tensor  # [B, T, 64] float32

    def context(self, dtype: torch.dtype) -> torch.Tensor:
        return context_latents(self.src, self.chunk).to(dtype)


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
                out = _Denoiser(self.bundle, group).run(progress)
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

    # ---- decode ---------------------------------------------------------------------------------------------------

    def _decode(self, plans: list[Plan], latents: dict[int, torch.Tensor]) -> dict[int, torch.Tensor]:
        """VAE-decode each item at its own length (equal lengths together), then anti-clip + -1 dBFS per track."""
        groups: dict[tuple[int, bool], list[int]] = {}
        for p in plans:
            tile = p.semantics.tiled_decode if self.tiled_decode is None else self.tiled_decode
            groups.setdefault((p.frames, tile), []).append(p.index)
        out = {}
        for (_, tile), idx in groups.items():
            z = torch.stack([latents[i] for i in idx])
            audio = self.bundle.vae.decode(z, tile=tile).float().cpu()
            for i, a in zip(idx, audio):
                out[i] = normalize_output(a)
        return out


class _Denoiser:
    """One denoising loop over a batch of planned items that share the schedule and the guidance.

    The loop knows no task: it asks each item's :class:`~acestep_train.conditioning.tasks.TaskItem` for its context,
    start point and hooks, and its plan's semantics for the start rule. Latents stay float32 between steps; the DiT
    gets its inputs in its own dtype, the condition encoder in its own (they differ in full fine-tuning).
    """

    def __init__(self, bundle, plans: list[Plan]):
        self.bundle, self.plans = bundle, plans
        self.dit = bundle.model.decoder
        self.device, self.dtype = dit_device_dtype(bundle)
        self.schedule, self.guidance = plans[0].schedule, plans[0].guidance
        self.b = self._prepare()
        items = self.b.items
        self.enc, self.enc_mask = self._conditions(list(range(len(plans))))
        self.switch_rows = [i for i, it in enumerate(items) if it.switch_step is not None]
        self.alt = self._conditions(self.switch_rows, switched=True)
        self.switched: set[int] = set()
        self.kv = None
        self.context = self.b.context(self.dtype)

    def _prepare(self) -> _Batch:
        device, dtype = self.device, self.dtype
        items = [prepare_item(self.bundle, p) for p in self.plans]
        frames = [it.frames for it in items]
        t = max(frames)
        frame_mask = None
        if len(set(frames)) > 1:
            frame_mask = torch.arange(t, device=device)[None] < torch.tensor(frames, device=device)[:, None]
        noise = []
        dim = self.bundle.config.audio_acoustic_hidden_dim
        for p in self.plans:
            g = torch.Generator(p.rand_device).manual_seed(p.seed)
            n = torch.randn((1, p.frames, dim), generator=g, device=p.rand_device, dtype=dtype)
            noise.append(n[0].to(device=device, dtype=torch.float32))
        return _Batch(self.plans, items, frames, frame_mask, _pad_stack([it.src for it in items], t),
                      _pad_stack([it.chunk for it in items], t), _pad_stack(noise, t))

    def _conditions(self, rows: list[int], switched: bool = False):
        if not rows:
            return None, None
        items = self.b.items
        fields = [self.plans[i].condition_fields(items[i].switch_task if switched else None) for i in rows]
        return encode_conditions(self.bundle, fields, [items[i].refer for i in rows])

    def _initial_latents(self) -> torch.Tensor:
        b = self.b
        x = b.noise.clone()
        for i, (p, it) in enumerate(zip(b.plans, b.items)):
            x[i, : p.frames] = p.semantics.start_latents(b.noise[i, : p.frames], it.init_source,
                                                         p.schedule.timesteps[0], p.denoising_strength)
        return x

    def _switch_due(self, step: int) -> None:
        """Items whose ``switch_step`` has come get their new condition rows and context source (new K/V)."""
        due = [i for i in self.switch_rows if i not in self.switched and step >= self.b.items[i].switch_step]
        if not due:
            return
        width = max(self.enc.shape[1], self.alt[0].shape[1])
        enc, enc_mask = _pad_condition(self.enc, self.enc_mask, width)
        alt_enc, alt_mask = _pad_condition(*self.alt, width)
        enc, enc_mask, src = enc.clone(), enc_mask.clone(), self.b.src.clone()
        for i in due:
            j = self.switch_rows.index(i)
            enc[i], enc_mask[i] = alt_enc[j], alt_mask[j]
            src[i, : self.b.frames[i]] = self.b.items[i].switch_src
        self.b.src, self.enc, self.enc_mask = src, enc, enc_mask
        self.switched.update(due)
        self.context = self.b.context(self.dtype)
        self.kv = None

    def _cross_kv(self):
        if self.kv is None:
            enc = self.enc.to(self.dtype)  # the condition encoder may run in another dtype than the DiT
            null = self.bundle.model.null_condition_emb
            rows = torch.cat([enc, null.expand_as(enc).to(self.dtype)]) if self.guidance.enabled else enc
            self.kv = self.dit.cross_kv(rows)
        return self.kv

    def _velocity(self, x: torch.Tensor, t: float, state) -> torch.Tensor:
        """The (guided) velocity at ``x``, float32; conditional and unconditional rows in one DiT forward."""
        kv, n_items, b = self._cross_kv(), len(self.plans), self.b
        use_guidance = self.guidance.active(t)
        x_in, ctx_in, fmask, emask = x.to(self.dtype), self.context, b.frame_mask, _mask_or_none(self.enc_mask)
        if use_guidance:
            x_in, ctx_in = torch.cat([x_in, x_in]), torch.cat([ctx_in, ctx_in])
            fmask = None if fmask is None else torch.cat([fmask, fmask])
            emask = None if emask is None else torch.cat([emask, emask])
        elif self.guidance.enabled:
            kv = [(k[:n_items], v[:n_items]) for k, v in kv]
        tt = torch.full((x_in.shape[0],), t, dtype=self.dtype, device=self.device)
        v = self.dit(x_in, tt, tt, None, ctx_in, attention_mask=fmask, encoder_attention_mask=emask,
                     cross_kv=kv).float()
        if not use_guidance:
            return v
        v_cond, v_uncond = v.chunk(2)
        if b.frame_mask is not None:  # padded frames must not enter APG's norms over time
            v_cond = v_cond * b.frame_mask[..., None]
            v_uncond = v_uncond * b.frame_mask[..., None]
        return self.guidance.combine(v_cond, v_uncond, x_t=x, t=t, state=state)

    def run(self, progress: bool) -> torch.Tensor:
        b, schedule = self.b, self.schedule
        x = self._initial_latents()
        state = self.guidance.new_state()
        bar = tqdm(total=schedule.steps, disable=not progress, desc=f"sampling {len(self.plans)} item(s)",
                   leave=False)
        for step, ((t, t_next), dt) in enumerate(zip(schedule.pairs(), schedule.deltas())):
            self._switch_due(step)
            v = self._velocity(x, t, state)
            for i, it in enumerate(b.items):
                it.velocity(v[i, : it.frames], x[i, : it.frames], t)
            x = x + v * dt
            if b.frame_mask is not None:
                x = x * b.frame_mask[..., None]
            for i, it in enumerate(b.items):
                it.after_step(x[i, : it.frames], b.noise[i, : it.frames], step, t_next)
            bar.update()
        bar.close()
        for i, it in enumerate(b.items):
            it.finish(x[i, : it.frames])
        return x
