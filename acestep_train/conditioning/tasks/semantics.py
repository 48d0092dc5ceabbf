"""The two sampling semantics as strategy objects: the official ACE-Step pipeline and DiffSynth's.

They agree on the model and the prompts and differ in a handful of rules; each rule is one method here, so the
request planner, the tasks and the sampler ask the strategy instead of branching on its name:

=========================  =============================================  ==========================================
rule                        official                                       diffsynth
=========================  =============================================  ==========================================
text2music length           ``max(128, int(round(d, 1)·rate) // hop)``     ``round(d·rate / hop)``
cover length                the source's frames                            rounded up to whole 5-frame codes
metas duration              requested (text2music) / output length          always the requested duration
guidance default            the variant's (turbo: none)                    plain CFG when the scale is not 1
guidance interval default   the variant's                                  ``(0, 1)``
VAE encode of inputs        a posterior sample                             the posterior mean
VAE decode                  tiled                                          one pass
cover hints                 cropped to the source length                   not cropped
audio-to-audio start        ``t0·noise + (1-t0)·source`` when strength<1   ``(1-t0)·source + t0·noise`` when a
                                                                           source exists
repaint                     :class:`~.repaint.InjectRepaintItem`           :class:`~.repaint.BlendRepaintItem`
=========================  =============================================  ==========================================
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import torch

from acestep_train.conditioning.tasks.repaint import (BlendRepaintItem, InjectRepaintItem, Repaint,
                                                      soft_region_mask)

OFFICIAL_MIN_FRAMES = 128
CODE_FRAMES = 5  # latent frames per 5 Hz audio code


class Semantics:
    """One set of rules (see the module table). Stateless; use :data:`OFFICIAL` / :data:`DIFFSYNTH`."""

    name: str
    vae_sample: bool  # default for encoding input audio: posterior sample (True) or mean
    tiled_decode: bool  # default VAE decode: 512-frame tiles (True) or one pass
    crop_cover_hints: bool  # cover hints cropped back to the source length

    def text2music_frames(self, duration: float, sample_rate: int, hop: int) -> int:
        raise NotImplementedError

    def cover_frames(self, source_frames: int) -> int:
        return source_frames

    def metas_duration(self, requested: float, output_seconds: float, length_from_audio: bool) -> float:
        return requested

    def guidance_interval(self, defaults) -> Sequence[float]:
        raise NotImplementedError

    def default_guidance(self, scale: float | None, defaults) -> tuple[str, float]:
        """``(kind, scale)`` when the request names no guidance kind; ``scale`` is the request's (or None)."""
        raise NotImplementedError

    def start_latents(self, noise: torch.Tensor, source: torch.Tensor | None, t0: float,
                      denoising_strength: float) -> torch.Tensor:
        """Where denoising starts for one item ``[T, C]`` (``noise`` is float32, ``source`` its start audio)."""
        raise NotImplementedError

    def repaint_item(self, task: Repaint, frames: int, latents: torch.Tensor, silence: torch.Tensor, **kw):
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"<{self.name} semantics>"


class Official(Semantics):
    name = "official"
    vae_sample = True
    tiled_decode = True
    crop_cover_hints = True

    def text2music_frames(self, duration: float, sample_rate: int, hop: int) -> int:
        return max(OFFICIAL_MIN_FRAMES, int(round(duration, 1) * sample_rate) // hop)

    def metas_duration(self, requested: float, output_seconds: float, length_from_audio: bool) -> float:
        return output_seconds if length_from_audio else requested

    def guidance_interval(self, defaults) -> Sequence[float]:
        return tuple(defaults.guidance_interval)

    def default_guidance(self, scale: float | None, defaults) -> tuple[str, float]:
        kind = defaults.guidance
        if kind == "none":
            if scale is not None and scale != 1.0:
                warnings.warn(f"cfg_scale={scale} is ignored: this model samples without guidance (official "
                              f"turbo); pass guidance='cfg' or 'apg' to force it", stacklevel=5)
            return kind, 1.0
        return kind, defaults.guidance_scale if scale is None else scale

    def start_latents(self, noise, source, t0, denoising_strength):
        if denoising_strength < 1.0:  # official cover_noise_strength = 1 - denoising_strength
            return t0 * noise + (1 - t0) * source
        return noise

    def repaint_item(self, task: Repaint, frames: int, latents: torch.Tensor, silence: torch.Tensor, **kw):
        # Silence in the region (chunk mask 1 there), the clean source outside (chunk mask 0); the loop re-injects
        # the noised source outside the region for the first steps and crossfades back to it at the end.
        keep = torch.ones(frames, dtype=torch.bool, device=latents.device)
        for a, b in task.region_frames:
            keep[a:b] = False
        return InjectRepaintItem(frames=frames, src=torch.where(keep[:, None], latents, silence),
                                 chunk=(~keep).float(), keep=keep, clean=latents,
                                 crossfade=soft_region_mask(keep, task.crossfade_frames),
                                 inject_steps=task.inject_steps, **kw)


class DiffSynth(Semantics):
    name = "diffsynth"
    vae_sample = False
    tiled_decode = False
    crop_cover_hints = False

    def text2music_frames(self, duration: float, sample_rate: int, hop: int) -> int:
        return round(duration * sample_rate / hop)

    def cover_frames(self, source_frames: int) -> int:
        return -(-source_frames // CODE_FRAMES) * CODE_FRAMES  # hints are not cropped back to the source length

    def guidance_interval(self, defaults) -> Sequence[float]:
        return (0.0, 1.0)

    def default_guidance(self, scale: float | None, defaults) -> tuple[str, float]:
        scale = defaults.guidance_scale if scale is None else scale
        return ("cfg" if scale != 1.0 else "none"), scale

    def start_latents(self, noise, source, t0, denoising_strength):
        if source is None:
            return noise
        return (1 - t0) * source + t0 * noise  # FlowMatchScheduler.add_noise

    def repaint_item(self, task: Repaint, frames: int, latents: torch.Tensor, silence: torch.Tensor, **kw):
        # A soft mask m: repainting_strength in the ranges, 1 in the padding (always repainted), 0 elsewhere; the
        # source is blended towards silence by m and the loop blends the velocity towards the source by 1 - m.
        m = torch.zeros(frames, device=latents.device)
        for s, e in task.blend_frames:
            m[s:e] = task.strength
        left, right = task.pad_frames
        m[:left] = 1.0
        if right:
            m[frames - right:] = 1.0
        return BlendRepaintItem(frames=frames, src=latents * (1 - m[:, None]) + silence * m[:, None],
                                chunk=torch.ones(frames, device=latents.device), blend=m, blend_src=latents, **kw)


OFFICIAL = Official()
DIFFSYNTH = DiffSynth()
SEMANTICS: dict[str, Semantics] = {s.name: s for s in (OFFICIAL, DIFFSYNTH)}


def semantics_named(name: Any) -> Semantics:
    """The strategy called ``name``; ValueError listing the choices otherwise."""
    if not isinstance(name, str) or name not in SEMANTICS:
        raise ValueError(f"unknown semantics {name!r}; choose one of {', '.join(SEMANTICS)}")
    return SEMANTICS[name]
