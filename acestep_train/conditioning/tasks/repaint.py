"""repaint: regenerate time ranges of a source and keep the rest. The source is VAE-encoded (zero-padded first
when a range reaches outside it); how the ranges enter the context and the loop is the semantics' choice:

* :class:`InjectRepaintItem` (official): silence in the region with chunk mask 1 there and 0 outside; for the
  first ``inject_steps`` steps the source, noised to the next t with the item's own noise, replaces the latents
  outside the region; at the end a linear crossfade of ``crossfade_frames`` frames returns to the clean source.
* :class:`BlendRepaintItem` (DiffSynth): chunk mask all ones; the source blended towards silence by a mask ``m``
  (``strength`` in the ranges, 1 in the padding, 0 elsewhere), and every step's velocity blended towards the source,
  ``v = v_src·(1-m) + v·m`` with ``v_src = (x_t - source) / t``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from acestep_train.conditioning.tasks.context import TaskItem
from acestep_train.conditioning.tasks.task import Encoders, Task

if TYPE_CHECKING:
    from acestep_train.conditioning.tasks.semantics import Semantics


@dataclass(frozen=True, eq=False)
class Repaint(Task):
    semantics: Semantics
    source: torch.Tensor  # [2, N] 48 kHz, already padded to cover every range
    ranges_s: tuple[tuple[float, float], ...]  # seconds, in padded coordinates
    region_frames: tuple[tuple[int, int], ...]  # frame ranges clamped to the output (official rule)
    blend_frames: tuple[tuple[int, int], ...]  # frame ranges, unclamped (DiffSynth rule)
    pad_samples: tuple[int, int] = (0, 0)  # zero padding added left / right of the source
    pad_frames: tuple[int, int] = (0, 0)
    strength: float = 1.0  # DiffSynth: mask value inside the ranges
    inject_steps: int = 0  # official: steps with source injection
    crossfade_frames: int = 10  # official: final crossfade width
    name = "repaint"

    def item(self, enc: Encoders, frames: int) -> TaskItem:
        lat = enc.audio(self.source)
        return self.semantics.repaint_item(self, frames, lat, enc.silence(frames), init_source=lat)

    def params(self) -> dict[str, Any]:
        return {**super().params(), "repaint_ranges_padded": [list(x) for x in self.ranges_s] or None,
                "repaint_frames": [list(x) for x in self.region_frames] or None,
                "pad_samples": list(self.pad_samples)}


@dataclass(kw_only=True)
class InjectRepaintItem(TaskItem):
    keep: torch.Tensor  # [T] bool, True outside the region
    clean: torch.Tensor  # [T, C] the source latents
    crossfade: torch.Tensor  # [T] final weight of the generated latents
    inject_steps: int

    def after_step(self, x: torch.Tensor, noise: torch.Tensor, step: int, t_next: float) -> None:
        if step < self.inject_steps:
            kept = t_next * noise + (1 - t_next) * self.clean
            x.copy_(torch.where(self.keep[:, None], kept, x))

    def finish(self, x: torch.Tensor) -> None:
        w = self.crossfade[:, None]
        x.copy_(w * x + (1 - w) * self.clean)


@dataclass(kw_only=True)
class BlendRepaintItem(TaskItem):
    blend: torch.Tensor  # [T] m
    blend_src: torch.Tensor  # [T, C] the source latents

    def velocity(self, v: torch.Tensor, x: torch.Tensor, t: float) -> None:
        m = self.blend[:, None]
        v.copy_(((x - self.blend_src) / t) * (1 - m) + v * m)


def soft_region_mask(keep: torch.Tensor, width: int) -> torch.Tensor:
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
