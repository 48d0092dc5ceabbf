"""Timestep schedules of the flow-matching sampler (``docs/pipeline.md`` §5.2–5.4, §6.5–6.6).

A schedule is the list of t values at which the DiT is evaluated, from noise (t near 1) downwards; step i goes
from ``t[i]`` to ``t[i+1]`` and the last step goes to 0 (``x0 = x_t - t·v``).

* ``turbo`` (official turbo ``generate_audio``): shift rounded to the nearest of 1, 2, 3 and the fixed 8-step table
  for it; custom timesteps are snapped to ``VALID_TIMESTEPS``.
* ``continuous`` / ``linear`` (turbo-continuous, official base/sft): ``linspace(1, 0, N+1)[:-1]`` with the shift
  transform ``s·t / (1 + (s-1)·t)`` for any float shift. The two names give the same values; they record intent.
* ``diffsynth`` (``FlowMatchScheduler.set_timesteps_ace_step``): ``linspace(strength, 0, N+1)[:-1]`` then shifted, so
  audio-to-audio keeps N steps and starts at the *shifted* strength.
* official audio-to-audio (``cover_noise_strength = 1 - denoising_strength``): the schedule is truncated to start at
  the entry nearest to ``denoising_strength`` (fewer steps), see :func:`truncate_at`.

Every schedule is computed in float32 with torch ops (as DiffSynth does), so ``semantics="diffsynth"`` reproduces its
sigmas bit for bit.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

VALID_SHIFTS: tuple[float, ...] = (1.0, 2.0, 3.0)
SHIFT_TIMESTEPS: dict[float, tuple[float, ...]] = {
    1.0: (1.0, 0.875, 0.75, 0.625, 0.5, 0.375, 0.25, 0.125),
    2.0: (1.0, 0.9333333333333333, 0.8571428571428571, 0.7692307692307693, 0.6666666666666666, 0.5454545454545454,
          0.4, 0.2222222222222222),
    3.0: (1.0, 0.9545454545454546, 0.9, 0.8333333333333334, 0.75, 0.6428571428571429, 0.5, 0.3),
}
# The union of the three tables, descending (official ``VALID_TIMESTEPS``).
VALID_TIMESTEPS: tuple[float, ...] = (
    1.0, 0.9545454545454546, 0.9333333333333333, 0.9, 0.875, 0.8571428571428571, 0.8333333333333334,
    0.7692307692307693, 0.75, 0.6666666666666666, 0.6428571428571429, 0.625, 0.5454545454545454, 0.5, 0.4, 0.375,
    0.3, 0.25, 0.2222222222222222, 0.125,
)
TURBO_STEPS = 8
MAX_CUSTOM_TIMESTEPS = 20
SCHEDULE_KINDS = ("turbo", "continuous", "linear")


@dataclass(frozen=True)
class Schedule:
    """The t values of each step (float32 values stored as Python floats), and how they were obtained."""

    timesteps: tuple[float, ...]
    kind: str  # turbo | continuous | linear | custom | custom-snapped | diffsynth
    shift: float | None  # the shift actually applied (after rounding for turbo); None for custom lists
    truncated_from: int | None = None  # official audio-to-audio: length of the schedule before truncation

    @property
    def steps(self) -> int:
        return len(self.timesteps)

    def pairs(self) -> list[tuple[float, float]]:
        """``(t, t_next)`` per step, the last ``t_next`` being 0. Differences are taken in float32."""
        return list(zip(self.timesteps, self.timesteps[1:] + (0.0,)))

    def deltas(self) -> list[float]:
        """``t_next - t`` per step computed in float32 (DiffSynth's ``sigma_ - sigma``)."""
        t = torch.tensor(self.timesteps + (0.0,), dtype=torch.float32)
        return (t[1:] - t[:-1]).tolist()


def shift_timesteps(t: torch.Tensor, shift: float) -> torch.Tensor:
    """The flow-matching shift ``s·t / (1 + (s-1)·t)`` (identity for s = 1)."""
    if shift == 1.0:
        return t
    return shift * t / (1 + (shift - 1) * t)


def _floats(t: torch.Tensor) -> tuple[float, ...]:
    return tuple(float(v) for v in t.to(torch.float32).tolist())


def round_shift(shift: float) -> float:
    """Nearest of ``VALID_SHIFTS`` (official turbo); ties go to the smaller shift."""
    return min(VALID_SHIFTS, key=lambda s: (abs(s - shift), s))


def turbo_schedule(shift: float) -> Schedule:
    s = round_shift(shift)
    return Schedule(_floats(torch.tensor(SHIFT_TIMESTEPS[s], dtype=torch.float32)), "turbo", s)


def linear_schedule(steps: int, shift: float, start: float = 1.0, kind: str = "linear") -> Schedule:
    """``linspace(start, 0, steps+1)[:-1]`` then shifted, in float32."""
    t = torch.linspace(start, 0.0, steps + 1, dtype=torch.float32)[:-1]
    return Schedule(_floats(shift_timesteps(t, shift)), kind, float(shift))


def diffsynth_schedule(steps: int, shift: float, denoising_strength: float = 1.0) -> Schedule:
    """DiffSynth ``set_timesteps_ace_step``: N steps from the shifted ``denoising_strength``."""
    return linear_schedule(steps, shift, start=denoising_strength, kind="diffsynth")


def check_custom_timesteps(timesteps: Sequence[float]) -> list[float]:
    """Trailing zeros removed; every value in (0, 1], strictly decreasing, at most 20. Raises ValueError."""
    if isinstance(timesteps, (str, bytes)) or not isinstance(timesteps, Sequence):
        raise ValueError(f"timesteps must be a list of numbers in (0, 1], got {type(timesteps).__name__}")
    vals = [float(v) for v in timesteps]
    while vals and vals[-1] == 0.0:
        vals.pop()
    if not vals:
        raise ValueError("timesteps is empty (after removing trailing zeros)")
    if len(vals) > MAX_CUSTOM_TIMESTEPS:
        raise ValueError(f"timesteps has {len(vals)} entries; at most {MAX_CUSTOM_TIMESTEPS} are allowed")
    bad = [v for v in vals if not 0.0 < v <= 1.0]
    if bad:
        raise ValueError(f"timesteps must lie in (0, 1]; got {bad[:3]}")
    if any(b >= a for a, b in zip(vals, vals[1:])):
        raise ValueError(f"timesteps must be strictly decreasing, got {vals}")
    return vals


def snap_timesteps(timesteps: Sequence[float]) -> list[float]:
    """Official turbo: each custom value replaced by the nearest of ``VALID_TIMESTEPS``."""
    snapped = [min(VALID_TIMESTEPS, key=lambda v: abs(v - t)) for t in timesteps]
    if len(set(snapped)) != len(snapped):
        raise ValueError(f"timesteps {list(timesteps)} snap to repeated turbo values {snapped}; the turbo schedule "
                         f"only has the values {list(VALID_TIMESTEPS)}")
    return snapped


def custom_schedule(timesteps: Sequence[float], snap: bool) -> Schedule:
    vals = check_custom_timesteps(timesteps)
    if snap:
        vals = snap_timesteps(vals)
    return Schedule(_floats(torch.tensor(vals, dtype=torch.float32)), "custom-snapped" if snap else "custom", None)


def truncate_at(schedule: Schedule, strength: float) -> Schedule:
    """Official ``cover_noise_strength``: start at the schedule entry nearest to ``strength`` (= 1 - noise strength).

    Ties go to the earlier (larger t) entry. Strength 1 keeps the schedule.
    """
    if strength >= 1.0:
        return schedule
    i = min(range(schedule.steps), key=lambda k: (abs(schedule.timesteps[k] - strength), k))
    return Schedule(schedule.timesteps[i:], schedule.kind, schedule.shift, truncated_from=schedule.steps)


def resolve_schedule(*, semantics: str, kind: str, steps: int, shift: float, timesteps: Sequence[float] | None,
                     denoising_strength: float) -> Schedule:
    """The schedule of one request. Raises ValueError with the reason when the combination is not possible."""
    if semantics == "diffsynth":
        if timesteps is not None:
            return custom_schedule(timesteps, snap=False)
        return diffsynth_schedule(steps, shift, denoising_strength)
    if kind not in SCHEDULE_KINDS:
        raise ValueError(f"unknown schedule {kind!r}; choose one of {', '.join(SCHEDULE_KINDS)}")
    if timesteps is not None:
        sched = custom_schedule(timesteps, snap=kind == "turbo")
    elif kind == "turbo":
        if steps != TURBO_STEPS:
            raise ValueError(f"the turbo schedule has exactly {TURBO_STEPS} steps (official fixed tables), got "
                             f"num_inference_steps={steps}; use schedule='continuous' (linspace + shift) or custom "
                             f"timesteps for another step count")
        sched = turbo_schedule(shift)
    else:
        sched = linear_schedule(steps, shift, kind=kind)
    return truncate_at(sched, denoising_strength)
