"""Text conditioning shared by the sampler and training, so the two cannot build prompts differently.

Per item: caption prompt = ``SFT_GEN_PROMPT`` (instruction, caption, metas string) → full Qwen3 pass;
lyric prompt = ``LYRIC_GEN_PROMPT`` (language, lyrics) → ``embed_tokens`` only (``pipeline.md`` §4).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields

import torch

from acestep_train.models.text_encoder import TextEncoder
from acestep_train.conditioning.prompts import caption_prompt, format_metas, lyric_prompt


@dataclass
class TextConditions:
    """Encoded text side of a batch. Masks are bool, True on real tokens; padded positions hold zeros."""

    text_hidden: torch.Tensor  # [B, Lt, E] caption last_hidden_state
    text_mask: torch.Tensor  # [B, Lt]
    lyric_embeds: torch.Tensor  # [B, Ll, E] lyric token embeddings
    lyric_mask: torch.Tensor  # [B, Ll]

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> "TextConditions":
        """Move all tensors to ``device``; cast only the float ones to ``dtype`` (masks stay bool)."""
        out = {}
        for f in fields(self):
            t = getattr(self, f.name)
            out[f.name] = t.to(device=device, dtype=None if t.dtype == torch.bool else dtype)
        return TextConditions(**out)


def _per_item(name: str, values, batch: int) -> list:
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
        raise ValueError(f"{name} must be a list with one entry per item ({batch}), got {type(values).__name__}")
    if len(values) != batch:
        raise ValueError(f"{name} has {len(values)} entries, expected one per caption ({batch})")
    return list(values)


def build_caption_prompts(
    captions: Sequence[str],
    *,
    bpm: Sequence,
    keyscale: Sequence,
    timesignature: Sequence,
    duration: Sequence,
    task: str | Sequence[str] = "text2music",
    tracks: Sequence | None = None,
) -> list[str]:
    """One full caption prompt per item (instruction + caption + metas). ``task`` is one str or one per item."""
    b = len(_per_item("captions", captions, len(captions)))
    if b == 0:
        raise ValueError("captions is empty")
    tasks = [task] * b if isinstance(task, str) else _per_item("task", task, b)
    track_list = [None] * b if tracks is None else _per_item("tracks", tracks, b)
    bpms = _per_item("bpm", bpm, b)
    keys = _per_item("keyscale", keyscale, b)
    sigs = _per_item("timesignature", timesignature, b)
    durs = _per_item("duration", duration, b)
    return [
        caption_prompt(captions[i], format_metas(bpms[i], sigs[i], keys[i], durs[i]), tasks[i], track_list[i])
        for i in range(b)
    ]


def build_lyric_prompts(lyrics: Sequence[str], vocal_language: Sequence[str]) -> list[str]:
    """One lyric prompt per item (language header + lyrics)."""
    b = len(_per_item("lyrics", lyrics, len(lyrics)))
    langs = _per_item("vocal_language", vocal_language, b)
    return [lyric_prompt(lyrics[i], langs[i]) for i in range(b)]


def encode_text_conditions(
    text_encoder: TextEncoder,
    captions: Sequence[str],
    lyrics: Sequence[str],
    *,
    bpm: Sequence,
    keyscale: Sequence,
    timesignature: Sequence,
    duration: Sequence,
    vocal_language: Sequence[str],
    task: str | Sequence[str] = "text2music",
    tracks: Sequence | None = None,
) -> TextConditions:
    """Build both prompts for every item and encode them. All per-item arguments are lists of length B
    (entries may be None for N/A metas); ``duration`` is seconds (None → 30)."""
    b = len(_per_item("captions", captions, len(captions)))
    _per_item("lyrics", lyrics, b)
    caption_texts = build_caption_prompts(
        captions, bpm=bpm, keyscale=keyscale, timesignature=timesignature, duration=duration, task=task, tracks=tracks
    )
    lyric_texts = build_lyric_prompts(lyrics, vocal_language)
    text_hidden, text_mask = text_encoder.encode_captions(caption_texts)
    lyric_embeds, lyric_mask = text_encoder.embed_lyrics(lyric_texts)
    return TextConditions(text_hidden, text_mask, lyric_embeds, lyric_mask)
