"""Guidance: combine the conditional and unconditional velocities (``docs/pipeline.md`` §5.5).

Velocities are ``[B, T, C]`` (time axis 1). The unconditional branch is the DiT run on ``null_condition_emb``
expanded over each item's packed condition sequence; the sampler runs both branches in one batched forward.

* ``cfg``: ``v_u + s·(v_c - v_u)`` (DiffSynth ``cfg_guided_model_fn``; the official plain-CFG path is the same).
* ``apg`` (official base/sft default): momentum −0.75 on the difference (one :class:`MomentumBuffer` per generation),
  the difference scaled so that its L2 norm over the time axis is at most 2.5 (per batch item and channel), then
  split in float64 into the parts parallel and orthogonal to ``v_c`` (normalised over time) and
  ``v = v_c + (s-1)·(orth + eta·par)`` with eta 0.
* ``adg`` (official optional "angle-based dynamic guidance"), implemented from the formulas in ``docs/pipeline.md``
  §5.5; not verified against the official code.

Guidance is applied only when ``interval[0] <= t <= interval[1]`` (official ``cfg_interval_start/end``); outside it
the conditional velocity is used and the sampler skips the unconditional pass.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

GUIDANCE_KINDS = ("none", "cfg", "apg", "adg")
APG_MOMENTUM = -0.75
APG_NORM_THRESHOLD = 2.5
APG_ETA = 0.0
ADG_MAX_ANGLE = math.pi / 6


class MomentumBuffer:
    """Running ``avg = x + momentum·avg`` (starts at 0). Create one per generation, never share between calls."""

    def __init__(self, momentum: float = APG_MOMENTUM):
        self.momentum = momentum
        self.running: torch.Tensor | float = 0.0

    def update(self, value: torch.Tensor) -> torch.Tensor:
        self.running = value + self.momentum * self.running
        return self.running


def cfg(v_cond: torch.Tensor, v_uncond: torch.Tensor, scale: float) -> torch.Tensor:
    return v_uncond + scale * (v_cond - v_uncond)


def apg(v_cond: torch.Tensor, v_uncond: torch.Tensor, scale: float, momentum: MomentumBuffer | None = None,
        norm_threshold: float = APG_NORM_THRESHOLD, eta: float = APG_ETA, dims: tuple[int, ...] = (1,)
        ) -> torch.Tensor:
    """Adaptive projected guidance with the official ACE-Step constants (norms and projection over ``dims``)."""
    diff = v_cond - v_uncond
    if momentum is not None:
        diff = momentum.update(diff)
    if norm_threshold > 0:
        norm = torch.linalg.vector_norm(diff, ord=2, dim=dims, keepdim=True)
        diff = diff * torch.clamp(norm_threshold / norm, max=1.0)  # norm 0 -> inf -> 1: unchanged
    d64 = diff.double()
    direction = F.normalize(v_cond.double(), dim=dims)
    parallel = (d64 * direction).sum(dim=dims, keepdim=True) * direction
    update = (d64 - parallel) + eta * parallel
    return v_cond + (scale - 1.0) * update.to(diff.dtype)


def adg(v_cond: torch.Tensor, v_uncond: torch.Tensor, x_t: torch.Tensor, t: float, scale: float) -> torch.Tensor:
    """Angle-based dynamic guidance on the predicted clean latents (per item and frame, over channels)."""
    x_c = (x_t - t * v_cond).double()
    x_u = (x_t - t * v_uncond).double()
    cos = F.cosine_similarity(x_c, x_u, dim=-1, eps=1e-8).clamp(-1.0, 1.0)[..., None]
    theta = torch.arccos(cos)
    w = max(scale - 1.0, 0.0) + 1e-3
    theta_new = (w * theta).clamp(-ADG_MAX_ANGLE, ADG_MAX_ANGLE)
    u_dir = F.normalize(x_u, dim=-1)
    d = x_c - x_u
    perp = d - (d * u_dir).sum(-1, keepdim=True) * u_dir
    sin = torch.sin(theta)
    ratio = torch.where(sin > 1e-3, torch.sin(theta_new) / sin.clamp(min=1e-3), torch.full_like(sin, w))
    x_new = torch.cos(theta_new) * x_c + perp * ratio
    return ((x_t.double() - x_new) / t).to(v_cond.dtype)


@dataclass(frozen=True)
class Guidance:
    """How one generation combines the two branches."""

    kind: str = "none"
    scale: float = 1.0
    interval: tuple[float, float] = (0.0, 1.0)

    def __post_init__(self):
        if self.kind not in GUIDANCE_KINDS:
            raise ValueError(f"unknown guidance {self.kind!r}; choose one of {', '.join(GUIDANCE_KINDS)}")

    @property
    def enabled(self) -> bool:
        return self.kind != "none" and self.scale != 1.0

    def active(self, t: float) -> bool:
        return self.enabled and self.interval[0] <= t <= self.interval[1]

    def new_state(self) -> MomentumBuffer | None:
        return MomentumBuffer(APG_MOMENTUM) if self.kind == "apg" else None

    def combine(self, v_cond: torch.Tensor, v_uncond: torch.Tensor, *, x_t: torch.Tensor, t: float,
                state: MomentumBuffer | None) -> torch.Tensor:
        if self.kind == "cfg":
            return cfg(v_cond, v_uncond, self.scale)
        if self.kind == "apg":
            return apg(v_cond, v_uncond, self.scale, state)
        if self.kind == "adg":
            return adg(v_cond, v_uncond, x_t, t, self.scale)
        return v_cond
