"""The flow-matching training objective: its pure functions, and :class:`Objective`, which makes the draws and
computes the loss of a batch (``docs/training.md`` §1–3).

Convention (all released code agrees): ``x_t = t * noise + (1 - t) * x0``, the DiT predicts ``v = noise - x0``,
``timestep_r = t``. Unlike the existing trainers, the loss is averaged over valid (unpadded) frames only.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch

from datamodules.batch import Batch

from acestep_train.conditioning.tasks import Text2Music
from acestep_train.models.acestep import AceStepModel
from acestep_train.training.dtype_policy import DtypePolicy
from acestep_train.training.keyed_rng import Stream, draw_key, keyed_generator, keyed_global_rng

# The official vanilla LoRA trainer's discrete schedule: the 8 turbo shift-3 timesteps (docs/training.md §2).
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


class ObjectiveOutput(NamedTuple):
    loss: torch.Tensor  # mean squared error over valid frames (float32 scalar)
    t: torch.Tensor  # [B] the timesteps drawn
    dropped: torch.Tensor  # [B] bool: the condition was replaced by ``null_condition_emb``


class Objective:
    """The flow-matching loss of a batch and the draws it needs: condition dropout, t and noise.

    Every draw comes from a keyed generator (:mod:`~acestep_train.training.keyed_rng`): per sample in training, so a
    resumed run and a DDP run draw what the uninterrupted single-process run draws; one per batch in validation
    (the same draws every time, so curves are comparable) and under ``fixed_draws``.

    Args:
        config: timestep distribution and condition dropout.
        seed: base of every key.
        dtypes: the dtype each part of the model runs in (its inputs are cast to it).
    """

    def __init__(self, config: ObjectiveConfig, seed: int, dtypes: DtypePolicy):
        self.config = config
        self.seed = int(seed)
        self.dtypes = dtypes

    # ---- keyed generators -------------------------------------------------------------------------------------
    def training_generators(self, step: int, batch_size: int, rank: int = 0,
                            world_size: int = 1) -> torch.Generator | list[torch.Generator]:
        """One generator per sample, keyed on (seed, micro-batches trained, the sample's position in the *global*
        batch); under ``fixed_draws`` one generator for the batch, the same at every step.

        ``BucketBatchSampler`` deals item k of a global batch to rank ``k % world_size`` as its local item
        ``k // world_size``, so local item i of rank r is global item ``i * world_size + r``.
        """
        if self.config.fixed_draws:
            return keyed_generator(self.seed, None, 0, Stream.BATCH)
        return [keyed_generator(self.seed, step, i * world_size + rank, Stream.SAMPLE) for i in range(batch_size)]

    def validation_generator(self, batch_idx: int) -> torch.Generator:
        return keyed_generator(self.seed, None, batch_idx, Stream.BATCH)

    def model_rng(self, step: int, rank: int, device: torch.device | str):
        """A context in which the global RNG (dropout inside the model) is keyed on (seed, step, rank), restored
        on exit. Under ``fixed_draws`` it is keyed on the seed alone."""
        key = draw_key(self.seed, None if self.config.fixed_draws else step, rank, Stream.MODEL)
        return keyed_global_rng(key, device)

    # ---- the loss ---------------------------------------------------------------------------------------------
    def __call__(self, model: AceStepModel, silence_latent: torch.Tensor, batch: Batch,
                 generators: torch.Generator | Sequence[torch.Generator]) -> ObjectiveOutput:
        x0 = batch.latents
        b, frames, _ = x0.shape
        enc, enc_mask = self.conditions(model, silence_latent, batch)
        enc, dropped, t, noise = self.draws(batch, enc, model.null_condition_emb, generators)
        t, noise = t.to(x0.device), noise.to(x0)
        x_t = noisy_latents(x0, noise, t)
        # The text2music context, built by the same task object the sampler asks (training == sampling).
        ctx = Text2Music().context(silence_latent, b, frames).to(x0)
        dit = self.dtypes.dit
        v = model.decoder(x_t.to(dit), t.to(dit), t.to(dit), enc.to(dit), ctx.to(dit),
                          attention_mask=batch.latent_mask, encoder_attention_mask=enc_mask)
        return ObjectiveOutput(masked_mse(v, flow_target(x0, noise), batch.latent_mask), t, dropped)

    def conditions(self, model: AceStepModel, silence_latent: torch.Tensor,
                   batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """The packed condition of a batch: exactly the code path the sampler uses."""
        dtype = self.dtypes.condition_encoder
        with torch.no_grad():
            return model.encode_conditions(
                batch.text_hidden.to(dtype), batch.text_mask, batch.lyric_embeds.to(dtype), batch.lyric_mask,
                silence_latent, None if batch.refer_latents is None else batch.refer_latents.to(dtype))

    def draws(self, batch: Batch, enc: torch.Tensor, null_emb: torch.Tensor,
              generators: torch.Generator | Sequence[torch.Generator]):
        """Condition dropout, t and noise for a batch: ``(enc, dropped, t, noise)``.

        One generator draws for the whole batch, in that order; a list draws sample i from ``generators[i]``
        alone, exactly what a one-sample batch would draw from it.
        """
        p = self.config.cfg_dropout
        if isinstance(generators, torch.Generator):
            enc, dropped = drop_conditions(enc, null_emb, p, generators)
            t = sample_timesteps(len(batch), self.config, generators)
            return enc, dropped, t, padded_noise(batch, generators)
        if len(generators) != len(batch):
            raise ValueError(f"{len(generators)} generators for a batch of {len(batch)}")
        b, frames, d = batch.latents.shape
        encs, dropped, t, noise = [], [], [], torch.zeros(b, frames, d)
        for i, (g, n) in enumerate(zip(generators, batch.latent_mask.sum(1).tolist())):
            e, drop = drop_conditions(enc[i : i + 1], null_emb, p, g)
            encs.append(e)
            dropped.append(drop)
            t.append(sample_timesteps(1, self.config, g))
            noise[i, :n] = torch.randn(int(n), d, generator=g)
        return torch.cat(encs), torch.cat(dropped), torch.cat(t), noise


def padded_noise(batch: Batch, generator: torch.Generator) -> torch.Tensor:
    """Noise drawn item by item over valid frames only, zero on padding: how much a clip is padded cannot change
    the noise its valid frames get (one draw over the padded shape would)."""
    b, t, d = batch.latents.shape
    noise = torch.zeros(b, t, d)
    for i, n in enumerate(batch.latent_mask.sum(1).tolist()):
        noise[i, :n] = torch.randn(int(n), d, generator=generator)
    return noise

