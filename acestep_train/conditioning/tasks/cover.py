"""cover: new music that follows the structure of a source. Context source: hint latents (the source through the
audio tokenizer and detokenizer, or decoded ``<|audio_code_N|>`` codes); chunk mask all ones. With
``switch_step`` the item is conditioned as text2music (instruction and silence source) from that step on."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from acestep_train.conditioning.tasks.context import TaskItem
from acestep_train.conditioning.tasks.task import Encoders, Task
from acestep_train.conditioning.tasks.text2music import Text2Music

if TYPE_CHECKING:
    from acestep_train.conditioning.tasks.semantics import Semantics


@dataclass(frozen=True, eq=False)
class Cover(Task):
    semantics: Semantics
    source: torch.Tensor | None = None  # [2, N] 48 kHz; None when codes are given
    codes: tuple[int, ...] | None = None  # 5 Hz audio codes (replace the source as the hint)
    switch_step: int | None = None  # step from which the item is conditioned as text2music
    name = "cover"

    def __post_init__(self):
        if (self.source is None) == (self.codes is None):
            raise ValueError("cover takes exactly one of a source audio and audio codes")

    def item(self, enc: Encoders, frames: int) -> TaskItem:
        silence = enc.silence(frames)
        init = None
        if self.codes is not None:
            src = enc.code_hints(self.codes)
        else:
            lat = enc.audio(self.source)
            src = enc.hints(lat, crop=self.semantics.crop_cover_hints)
            # Uncropped hints are longer than the source: the audio-to-audio start extends it with them.
            init = torch.cat([lat, src[lat.shape[0]:]], dim=0)
        switch = self.switch_step is not None
        return TaskItem(frames=frames, src=src, chunk=torch.ones(frames, device=src.device), init_source=init,
                        switch_step=self.switch_step, switch_src=silence if switch else None,
                        switch_task=Text2Music.name if switch else None)

    def params(self) -> dict[str, Any]:
        return {**super().params(), "audio_codes": None if self.codes is None else len(self.codes),
                "cover_switch_step": self.switch_step}
