"""The DiT's context latents and what one item of a task hands the denoising loop.

The DiT reads ``[source latents | chunk mask]`` (``[B, T, 2C]``) next to the noisy latents. Every task builds its
own source and mask (see the task classes); this module holds the pieces they share: silence latents tiled to any
length (the one place this is done), the concatenation, and :class:`TaskItem`, a task made concrete for one item
(tensors after the encoders ran, plus the per-step hooks the sampler calls without knowing which task it runs).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def silence_frames(silence_latent: torch.Tensor, frames: int) -> torch.Tensor:
    """``silence_latent[:frames]`` as ``[frames, C]``, tiled by repetition past its end.

    Both upstream pipelines tile the stored silence latent when a longer one is needed; training and sampling must
    agree on it, so every caller goes through here.
    """
    s = silence_latent.reshape(-1, silence_latent.shape[-1])
    if frames > s.shape[0]:
        s = s.repeat(-(-frames // s.shape[0]), 1)
    return s[:frames]


def context_latents(src: torch.Tensor, chunk: torch.Tensor) -> torch.Tensor:
    """``[..., T, C]`` source latents and a ``[..., T]`` chunk mask -> the DiT context ``[..., T, 2C]``."""
    return torch.cat([src, chunk[..., None].expand_as(src)], dim=-1)


@dataclass
class TaskItem:
    """One item of a task, ready to denoise: float32 tensors on the model device, time first.

    The sampler batches items of any task and calls the hooks below on each item's own frames; a task that needs
    nothing at a hook keeps the default (identity). ``switch_step``: from this step on the item is conditioned as
    ``switch_task`` with ``switch_src`` as its context source (cover's hand-over to text2music).
    """

    frames: int
    src: torch.Tensor  # [T, C] context source latents
    chunk: torch.Tensor  # [T] chunk mask
    init_source: torch.Tensor | None = None  # [T, C] what audio-to-audio starts from (see Semantics.start_latents)
    refer: torch.Tensor | None = None  # [n, F, C] timbre reference latents; None: silence timbre
    switch_step: int | None = None
    switch_src: torch.Tensor | None = None
    switch_task: str | None = None

    def velocity(self, v: torch.Tensor, x: torch.Tensor, t: float) -> None:
        """Adjust the velocity ``v`` ``[T, C]`` of this item in place before the Euler step (default: nothing)."""

    def after_step(self, x: torch.Tensor, noise: torch.Tensor, step: int, t_next: float) -> None:
        """Adjust the latents ``x`` ``[T, C]`` in place after Euler step ``step`` (default: nothing)."""

    def finish(self, x: torch.Tensor) -> None:
        """Adjust the final latents ``x`` ``[T, C]`` in place (default: nothing)."""
