"""Pad cached items into a ``Batch``: zeros past each item's length, with a boolean mask (True = valid)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from datamodules.batch import Batch


def collate(items: Sequence[dict]) -> Batch:
    """Stack ``CachedDataset`` items, zero-padding latents, caption and lyric tensors to the batch maximum."""
    if not items:
        raise ValueError("collate: empty batch")
    ids = [item["id"] for item in items]
    latents, latent_mask = _pad([item["latents"] for item in items], "latents", ids)
    text, text_mask = _pad([item["text_hidden"] for item in items], "text_hidden", ids)
    lyrics, lyric_mask = _pad([item["lyric_embeds"] for item in items], "lyric_embeds", ids)
    return Batch(latents=latents, latent_mask=latent_mask, text_hidden=text, text_mask=text_mask,
                 lyric_embeds=lyrics, lyric_mask=lyric_mask, ids=ids)


def _pad(tensors: list[torch.Tensor], name: str, ids: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    widths = {t.shape[1:] for t in tensors}
    dtypes = {t.dtype for t in tensors}
    if len(widths) > 1 or len(dtypes) > 1 or any(t.ndim != 2 for t in tensors):
        # Items from different encoders (or a half-rebuilt cache) must not be silently mixed.
        found = [(i, list(t.shape), str(t.dtype)) for i, t in zip(ids, tensors)]
        raise ValueError(f"collate: {name} items differ in feature size or dtype: {found}")
    lengths = torch.tensor([t.shape[0] for t in tensors])
    out = tensors[0].new_zeros(len(tensors), int(lengths.max()), tensors[0].shape[1])
    for i, t in enumerate(tensors):
        out[i, : t.shape[0]] = t
    mask = torch.arange(out.shape[1]) < lengths[:, None]
    return out, mask
