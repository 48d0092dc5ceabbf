"""What every task shares: the encoders it may ask for, and the steps of preparing one item.

A task object is a request's task *resolved*: its inputs decoded and checked, every rule of the chosen
:class:`~.semantics.Semantics` applied. ``prepare`` runs the encoders it needs and returns a
:class:`~.context.TaskItem` for the denoising loop; training asks the same objects for the same context, so the
conditioning a model is trained on is the conditioning it is sampled with.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar, Protocol

import torch

from acestep_train.conditioning.prompts import task_instruction
from acestep_train.conditioning.tasks.context import TaskItem


class Encoders(Protocol):
    """The encoders of one item (all outputs float32 ``[T, C]`` on the model device).

    One object per item: when inputs are encoded with a posterior sample they share one seeded generator, so the
    order of the calls is part of the result (timbre references, then the task's source, then the start audio).
    """

    def audio(self, audio: torch.Tensor) -> torch.Tensor: ...  # [2, N] 48 kHz -> VAE latents

    def hints(self, latents: torch.Tensor, crop: bool) -> torch.Tensor: ...  # latents -> tokenize -> detokenize

    def code_hints(self, codes: Sequence[int]) -> torch.Tensor: ...  # 5 Hz audio codes -> 25 Hz hint latents

    def silence(self, frames: int) -> torch.Tensor: ...  # silence latents of that length


class Task:
    """Base of the task classes. ``name`` is the task's key in the instruction table."""

    name: ClassVar[str]
    length_from_audio: ClassVar[bool] = True  # the output length comes from input audio (not from a duration)

    @property
    def instruction(self) -> str:
        """The instruction line of the caption prompt."""
        return task_instruction(self.name)

    def prepare(self, enc: Encoders, frames: int, *, references: Sequence[torch.Tensor] = (),
                start_audio: torch.Tensor | None = None) -> TaskItem:
        """Run the encoders for one item: timbre ``references`` (30 s clips), the task's own inputs, then the
        audio-to-audio ``start_audio`` (any task may start from audio instead of pure noise)."""
        refer = torch.stack([enc.audio(clip) for clip in references]) if len(references) else None
        item = self.item(enc, frames)
        item.refer = refer
        if start_audio is not None:
            item.init_source = fit_frames(enc.audio(start_audio), frames)
        return item

    def item(self, enc: Encoders, frames: int) -> TaskItem:
        """This task's context source, chunk mask and hooks for one item of ``frames`` frames."""
        raise NotImplementedError

    def params(self) -> dict[str, Any]:
        """The task's resolved values, JSON-friendly, for the generation record."""
        return dict(audio_codes=None, repaint_ranges_padded=None, repaint_frames=None, pad_samples=[0, 0],
                    cover_switch_step=None)


def fit_frames(latents: torch.Tensor, frames: int) -> torch.Tensor:
    """``[T', C]`` latents cut or zero-padded to ``frames``."""
    latents = latents[:frames]
    if latents.shape[0] < frames:
        latents = torch.cat([latents, latents.new_zeros(frames - latents.shape[0], latents.shape[1])])
    return latents
