"""Text conditioning shared by the sampler and training, so the two cannot build prompts differently.

Per item: caption prompt = ``SFT_GEN_PROMPT`` (instruction, caption, metas string) → full Qwen3 pass;
lyric prompt = ``LYRIC_GEN_PROMPT`` (language, lyrics) → ``embed_tokens`` only (``docs/pipeline.md`` §4).
"""

from __future__ import annotations

import re
import warnings
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
    labels: Sequence[str] | None = None,
) -> TextConditions:
    """Build both prompts for every item and encode them. All per-item arguments are lists of length B
    (entries may be None for N/A metas); ``duration`` is seconds (None → 30).

    ``labels`` name the items in warnings (e.g. ``"metadata.csv row 4 (song.wav)"``; default ``"item i"``).
    A caption or lyrics too long for the text encoder is reported with its label, quoting the user's own text
    where it is cut (the text encoder's generic warning, which can only quote the prompt template, is replaced).
    """
    b = len(_per_item("captions", captions, len(captions)))
    _per_item("lyrics", lyrics, b)
    names = [f"item {i}" for i in range(b)] if labels is None else [str(x) for x in _per_item("labels", labels, b)]
    caption_texts = build_caption_prompts(
        captions, bpm=bpm, keyscale=keyscale, timesignature=timesignature, duration=duration, task=task, tracks=tracks
    )
    lyric_texts = build_lyric_prompts(lyrics, vocal_language)
    _warn_if_cut(text_encoder, caption_texts, captions, text_encoder.max_caption_tokens, "caption", names)
    _warn_if_cut(text_encoder, lyric_texts, lyrics, text_encoder.max_lyric_tokens, "lyrics", names)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_ENCODER_TRUNCATION_WARNING, category=UserWarning)
        text_hidden, text_mask = text_encoder.encode_captions(caption_texts)
        lyric_embeds, lyric_mask = text_encoder.embed_lyrics(lyric_texts)
    return TextConditions(text_hidden, text_mask, lyric_embeds, lyric_mask)


# What TextEncoder warns on truncation; _warn_if_cut has already said it, better.
_ENCODER_TRUNCATION_WARNING = r"(caption|lyrics) \d+ has \d+ tokens; truncated"


def _warn_if_cut(text_encoder: TextEncoder, prompts: list[str], texts: Sequence[str], limit: int, what: str,
                 labels: list[str]) -> None:
    """Warn, per item, when the encoder's token limit cuts a prompt: where in the user's text, not the template."""
    ids = text_encoder.tokenizer(list(prompts), truncation=False, padding=False)["input_ids"]
    for prompt, text, item_ids, label in zip(prompts, texts, ids, labels):
        if len(item_ids) <= limit:
            continue
        kept = len(text_encoder.tokenizer.decode(item_ids[:limit]))  # characters of the prompt that survive
        at = prompt.find(text)
        head = f"{label}: {what} too long: its prompt has {len(item_ids)} tokens, the text encoder keeps {limit}"
        if at < 0 or kept >= at + len(text):
            # Only template text after the user's text is lost (for captions: the metas block).
            lost = "the metas after it are" if what == "caption" else "the end of the prompt is"
            verb = "fit" if what == "lyrics" else "fits"
            warnings.warn(f"{head}; the {what} itself {verb} ({_quote(text, 0, 60)}), but {lost} cut", stacklevel=3)
            continue
        cut = max(0, kept - at)
        verb = "are" if what == "lyrics" else "is"
        warnings.warn(f"{head}; the {what} {verb} cut after {cut} of its {len(text)} characters: kept "
                      f"…{_quote(text, max(0, cut - 40), cut)}, lost {_quote(text, cut, cut + 40)}…", stacklevel=3)


def _quote(text: str, start: int, end: int) -> str:
    return repr(re.sub(r"\s+", " ", text[start:end]))
