"""Condition encoder (checkpoint prefix ``encoder.``): caption projector, lyric encoder, timbre encoder and
the packing of the three into one condition sequence (``docs/architecture.md`` §5)."""

from __future__ import annotations

import torch
from torch import nn

from acestep_train.models.config import AceStepConfig
from acestep_train.models.layers import EncoderStack


def _encoder_stack_kwargs(cfg: AceStepConfig) -> dict:
    blk = cfg.encoder_block_kwargs()
    return dict(hidden_size=blk["hidden_size"], intermediate_size=blk["intermediate_size"],
                num_attention_heads=blk["num_attention_heads"], num_key_value_heads=blk["num_key_value_heads"],
                head_dim=cfg.head_dim, rms_norm_eps=cfg.rms_norm_eps, attention_bias=cfg.attention_bias,
                rope_theta=cfg.rope_theta, sliding_window=cfg.sliding_window, layer_types=cfg.layer_types)


def pack_sequences(h1: torch.Tensor, h2: torch.Tensor, m1: torch.Tensor, m2: torch.Tensor):
    """Concatenate two padded sequences and move each row's valid entries to the front (stable order).

    Returns ``(packed [B, L1+L2, D], mask [B, L1+L2] bool)``.
    """
    h = torch.cat([h1, h2], dim=1)
    m = torch.cat([m1.to(torch.bool), m2.to(torch.bool)], dim=1)
    order = m.to(torch.int8).argsort(dim=1, descending=True, stable=True)
    packed = torch.gather(h, 1, order[..., None].expand_as(h))
    mask = torch.arange(m.shape[1], device=m.device)[None] < m.sum(1, keepdim=True)
    return packed, mask


def unpack_by_order(rows: torch.Tensor, order: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Place packed rows ``[N, D]`` at ``[order[n], k]`` where k counts earlier rows of the same batch item.

    Returns ``(values [B, K, D], mask [B, K] bool)`` with ``B = max(order) + 1`` and K the largest count.
    """
    order = order.to(torch.long)
    n = order.shape[0]
    b = int(order.max()) + 1
    counts = torch.bincount(order, minlength=b)
    k = int(counts.max())
    # Position of each row among the rows of its own batch item, in packed order.
    same = order[:, None] == order[None, :]
    earlier = torch.tril(torch.ones(n, n, dtype=torch.bool, device=order.device), diagonal=-1)
    slot = (same & earlier).sum(1)
    out = rows.new_zeros(b, k, rows.shape[-1])
    out[order, slot] = rows
    mask = torch.zeros(b, k, dtype=torch.bool, device=rows.device)
    mask[order, slot] = True
    return out, mask


class LyricEncoder(EncoderStack):
    """Lyric token embeddings (1024) -> ``embed_tokens`` -> encoder layers (mask honoured) -> norm."""

    def __init__(self, cfg: AceStepConfig):
        super().__init__(cfg.num_lyric_encoder_hidden_layers, **_encoder_stack_kwargs(cfg))
        self.embed_tokens = nn.Linear(cfg.text_hidden_dim, cfg.encoder_width)

    def forward(self, lyric_hidden_states: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.run_layers(self.embed_tokens(lyric_hidden_states), mask)


class TimbreEncoder(EncoderStack):
    """Reference latents ``[N, frames, 64]`` -> one timbre vector per reference (output at frame 0).

    ``special_token`` is in the released files but the official forward never prepends it; kept for loading.
    """

    def __init__(self, cfg: AceStepConfig):
        super().__init__(cfg.num_timbre_encoder_hidden_layers, **_encoder_stack_kwargs(cfg))
        self.embed_tokens = nn.Linear(cfg.timbre_hidden_dim, cfg.encoder_width)
        self.special_token = nn.Parameter(torch.randn(1, 1, cfg.encoder_width) * 0.02)

    def forward(self, refer_packed: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.run_layers(self.embed_tokens(refer_packed), mask)[:, 0, :]


class ConditionEncoder(nn.Module):
    """Builds the packed condition sequence ``[valid lyric | valid timbre | valid text | padding]``."""

    def __init__(self, cfg: AceStepConfig):
        super().__init__()
        self.text_projector = nn.Linear(cfg.text_hidden_dim, cfg.encoder_width, bias=False)
        self.lyric_encoder = LyricEncoder(cfg)
        self.timbre_encoder = TimbreEncoder(cfg)

    def forward(
        self,
        text_hidden_states: torch.Tensor,
        text_attention_mask: torch.Tensor,
        lyric_hidden_states: torch.Tensor,
        lyric_attention_mask: torch.Tensor,
        refer_audio_packed: torch.Tensor | None,
        refer_audio_order_mask: torch.Tensor,
        timbre_packed: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``timbre_packed [N, W]`` may replace ``refer_audio_packed`` with already-encoded references."""
        text = self.text_projector(text_hidden_states)
        lyric = self.lyric_encoder(lyric_hidden_states, lyric_attention_mask)
        if timbre_packed is None:
            timbre_packed = self.timbre_encoder(refer_audio_packed)
        timbre, timbre_mask = unpack_by_order(timbre_packed, refer_audio_order_mask)
        if timbre.shape[0] != text.shape[0]:
            raise ValueError(f"refer_audio_order_mask covers {timbre.shape[0]} batch items but the caption batch "
                             f"has {text.shape[0]}; every item needs at least one reference (silence if none)")
        enc, mask = pack_sequences(lyric, timbre, lyric_attention_mask, timbre_mask)
        return pack_sequences(enc, text, mask, text_attention_mask)
