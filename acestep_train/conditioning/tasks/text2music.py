"""text2music: music from text alone. Context source: silence latents; chunk mask: all ones."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from acestep_train.conditioning.tasks.context import TaskItem, context_latents, silence_frames
from acestep_train.conditioning.tasks.task import Encoders, Task


@dataclass(frozen=True, eq=False)
class Text2Music(Task):
    name = "text2music"
    length_from_audio = False

    def context(self, silence_latent: torch.Tensor, batch: int, frames: int) -> torch.Tensor:
        """The DiT context ``[batch, frames, 2C]`` (silence source, all-ones chunk mask), in the silence latent's
        dtype and device: what the training objective feeds the DiT for text2music."""
        src = silence_frames(silence_latent, frames)
        return context_latents(src, src.new_ones(frames)).expand(batch, -1, -1)

    def item(self, enc: Encoders, frames: int) -> TaskItem:
        src = enc.silence(frames)
        return TaskItem(frames=frames, src=src, chunk=torch.ones(frames, device=src.device))
