"""The flow-matching training objective as pure functions (``training.md`` §1–3).

Convention (all released code agrees): ``x_t = t * noise + (1 - t) * x0``, the DiT predicts ``v = noise - x0``,
``timestep_r = t``. Unlike the existing trainers, the loss is averaged over valid (unpadded) frames only.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# The official vanilla LoRA trainer's discrete schedule: the 8 turbo shift-3 timesteps (training.md §2).
TURBO_SHIFT_TIMESTEPS = {
    1.0: [1.0, 0.875, 0.75, 0.625, 0.5, 0.375, 0.25, 0.125],
    2.0: [1.0, 0.9333333333333333, 0.8571428571428571, 0.7692307692307693, 0.6666666666666666,
          0.5454545454545454, 0.4, 0.2222222222222222],
    3.0: [1.0, 0.9545454545454546, 0.9, 0.8333333333333334, 0.75, 0.6428571428571429, 0.5, 0.3],
}
TIMESTEP_KINDS = ("logit_normal", "turbo_discrete", "uniform")


@dataclass
class ObjectiveConfig:
    """How t is drawn and how often the condition is dropped (defaults: the official model ``forward``)."""

    timesteps: str = "logit_normal"  # logit_normal | turbo_discrete | uniform
    mu: float = -0.4
    sigma: float = 1.0
    turbo_shift: float = 3.0  # which turbo table `turbo_discrete` draws from
    cfg_dropout: float = 0.15  # probability of replacing the whole condition by null_condition_emb
    fixed_draws: bool = False  # debug: the same t, noise and dropout at every step (overfit-one-batch checks)

    def __post_init__(self):
        if self.timesteps not in TIMESTEP_KINDS:
            raise ValueError(f"objective.timesteps={self.timesteps!r}; choose one of {list(TIMESTEP_KINDS)}")
        if self.timesteps == "turbo_discrete" and float(self.turbo_shift) not in TURBO_SHIFT_TIMESTEPS:
            raise ValueError(f"objective.turbo_shift={self.turbo_shift}; the turbo tables exist for "
                             f"{sorted(TURBO_SHIFT_TIMESTEPS)}")
        if not 0.0 <= self.cfg_dropout <= 1.0:
            raise ValueError(f"objective.cfg_dropout={self.cfg_dropout} must be within [0, 1]")


def sample_timesteps(n: int, cfg: ObjectiveConfig, generator: torch.Generator | None = None,
                     device: torch.device | str = "cpu") -> torch.Tensor:
    """``n`` values of t in [0, 1] (float32)."""
    if cfg.timesteps == "logit_normal":
        z = torch.randn(n, generator=generator) * cfg.sigma + cfg.mu
        t = torch.sigmoid(z)
    elif cfg.timesteps == "turbo_discrete":
        table = torch.tensor(TURBO_SHIFT_TIMESTEPS[float(cfg.turbo_shift)])
        t = table[torch.randint(len(table), (n,), generator=generator)]
    else:
        t = torch.rand(n, generator=generator)
    return t.to(device)


def noisy_latents(x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    tt = t.to(x0.dtype).view(-1, *([1] * (x0.dim() - 1)))
    return tt * noise + (1 - tt) * x0


def flow_target(x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    return noise - x0


def masked_mse(pred: torch.Tensor, target: torch.Tensor, frame_mask: torch.Tensor | None) -> torch.Tensor:
    """Mean squared error over valid frames and all channels, in float32.

    Every valid frame weighs the same whatever the batch's padding, so a clip padded two different ways
    gives the same loss and gradients.
    """
    err = (pred.float() - target.float()).pow(2)
    if frame_mask is None:
        return err.mean()
    m = frame_mask.to(err.dtype)[..., None]
    return (err * m).sum() / (m.sum() * err.shape[-1]).clamp_min(1.0)


def drop_conditions(enc: torch.Tensor, null_emb: torch.Tensor, p: float,
                    generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Replace each item's whole condition sequence by ``null_condition_emb`` with probability ``p``.

    Returns the new condition and the boolean per-item drop decision.
    """
    drop = torch.rand(enc.shape[0], generator=generator) < p
    if not bool(drop.any()):
        return enc, drop
    d = drop.to(enc.device)[:, None, None]
    return torch.where(d, null_emb.to(enc.dtype).expand_as(enc), enc), drop


def silence_context(silence_latent: torch.Tensor, batch: int, frames: int) -> torch.Tensor:
    """text2music context ``[B, T, 2C]``: silence latents as the source and an all-ones chunk mask."""
    src = silence_slice(silence_latent, frames)
    ctx = torch.cat([src, torch.ones_like(src)], dim=-1)
    return ctx.expand(batch, -1, -1)


def silence_slice(silence_latent: torch.Tensor, frames: int) -> torch.Tensor:
    """``silence_latent[:, :frames]``, tiled by repetition past its length (as the official code does)."""
    s = silence_latent.reshape(1, -1, silence_latent.shape[-1])
    if frames > s.shape[1]:
        s = s.repeat(1, -(-frames // s.shape[1]), 1)
    return s[:, :frames]
