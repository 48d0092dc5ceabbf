"""Transformer building blocks shared by the DiT and the encoder-width blocks of ACE-Step 1.5.

Numerics follow the released model (Qwen3-style blocks, ``docs/architecture.md`` §4.3–4.6): RMSNorm in fp32, RoPE
applied after the per-head q/k norm, GQA, bidirectional attention with an optional ``|i - j| <= window`` band.
Unlike the reference we honour key-padding masks whenever one is given, so padded batches train correctly;
with no mask the computation is the reference one.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    """Qwen3 RMSNorm: normalise in fp32, cast back, then scale (weight initialised to 1, no bias)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(dtype)


class Transpose(nn.Module):
    """Swap the time and channel axes. Exists so ``proj_in.1`` / ``proj_out.1`` keep their released names."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.transpose(1, 2)


def rotary_cos_sin(positions: int, head_dim: int, theta: float, device, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Default (unscaled) RoPE tables for positions ``0..positions-1``: ``[positions, head_dim]`` each.

    Computed on the fly rather than kept as a buffer: it is cheap, and a module built on the meta device
    then needs no buffer re-materialisation after loading.
    """
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64, device=device).float() / head_dim))
    freqs = torch.arange(positions, device=device, dtype=torch.float32)[:, None] * inv_freq[None, :]
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Non-interleaved rotate-half RoPE on ``[B, heads, S, head_dim]``."""
    return x * cos + _rotate_half(x) * sin


def self_attention_mask(
    seq_len: int, device, sliding_window: int | None, key_padding_mask: torch.Tensor | None
) -> torch.Tensor | None:
    """Boolean SDPA mask ``[B|1, 1, S, S]`` (True = may attend), or None when nothing needs masking.

    A padded query would otherwise see no key at all under a band and produce NaN, which then leaks into
    valid rows through ``0 * NaN``; letting every query see itself keeps padded rows finite without giving
    valid queries access to any padded key.
    """
    mask = None
    if sliding_window is not None and sliding_window < seq_len - 1:
        idx = torch.arange(seq_len, device=device)
        mask = ((idx[:, None] - idx[None, :]).abs() <= sliding_window)[None, None]
    if key_padding_mask is not None:
        kpm = key_padding_mask.to(device=device, dtype=torch.bool)
        if not bool(kpm.all()):
            eye = torch.eye(seq_len, dtype=torch.bool, device=device)
            pad = (kpm[:, None, None, :] | eye[None, None])
            mask = pad if mask is None else (mask & pad)
    return mask


def cross_attention_mask(key_padding_mask: torch.Tensor | None) -> torch.Tensor | None:
    """Boolean SDPA mask ``[B, 1, 1, L]`` hiding padded condition tokens, or None."""
    if key_padding_mask is None:
        return None
    kpm = key_padding_mask.to(torch.bool)
    if bool(kpm.all()):
        return None
    if not bool(kpm.any(dim=1).all()):
        raise ValueError("encoder_attention_mask has a row with no valid token; every item needs a condition")
    return kpm[:, None, None, :]


class Attention(nn.Module):
    """Multi-head GQA attention with per-head q/k RMSNorm (self- or cross-attention).

    Parameter names (``q_proj``, ``k_proj``, ``v_proj``, ``o_proj``, ``q_norm``, ``k_norm``) are the
    released ones.
    """

    def __init__(
        self,
        hidden_size: int,
        num_attention_heads: int,
        num_key_value_heads: int,
        head_dim: int,
        rms_norm_eps: float = 1e-6,
        attention_bias: bool = False,
        is_cross_attention: bool = False,
        kv_input_size: int | None = None,
    ):
        super().__init__()
        if num_attention_heads % num_key_value_heads:
            raise ValueError(
                f"num_attention_heads={num_attention_heads} is not a multiple of "
                f"num_key_value_heads={num_key_value_heads}")
        self.num_heads = num_attention_heads
        self.num_kv_heads = num_key_value_heads
        self.head_dim = head_dim
        self.is_cross_attention = is_cross_attention
        kv_in = kv_input_size or hidden_size
        self.q_proj = nn.Linear(hidden_size, num_attention_heads * head_dim, bias=attention_bias)
        self.k_proj = nn.Linear(kv_in, num_key_value_heads * head_dim, bias=attention_bias)
        self.v_proj = nn.Linear(kv_in, num_key_value_heads * head_dim, bias=attention_bias)
        self.o_proj = nn.Linear(num_attention_heads * head_dim, hidden_size, bias=attention_bias)
        self.q_norm = RMSNorm(head_dim, eps=rms_norm_eps)
        self.k_norm = RMSNorm(head_dim, eps=rms_norm_eps)

    def project_kv(self, kv_input: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys (normed) and values ``[B, kv_heads, L, head_dim]`` of a sequence.

        Cross-attention callers may compute this once for a constant condition and pass it as ``kv``.
        """
        shape = (*kv_input.shape[:-1], -1, self.head_dim)
        k = self.k_norm(self.k_proj(kv_input).view(shape)).transpose(1, 2)
        v = self.v_proj(kv_input).view(shape).transpose(1, 2)
        return k, v

    def forward(
        self,
        x: torch.Tensor,
        *,
        rope: tuple[torch.Tensor, torch.Tensor] | None = None,
        kv_input: torch.Tensor | None = None,
        kv: tuple[torch.Tensor, torch.Tensor] | None = None,
        attn_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        shape = (*x.shape[:-1], -1, self.head_dim)
        q = self.q_norm(self.q_proj(x).view(shape)).transpose(1, 2)
        if kv is None:
            k, v = self.project_kv(x if kv_input is None else kv_input)
        else:
            k, v = kv
        if rope is not None:
            cos, sin = rope
            q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, enable_gqa=self.num_heads != self.num_kv_heads)
        out = out.transpose(1, 2).reshape(*x.shape[:-1], self.num_heads * self.head_dim)
        return self.o_proj(out)


class MLP(nn.Module):
    """SwiGLU feed-forward ``down(silu(gate(x)) * up(x))`` with no biases (Qwen3MLP)."""

    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class EncoderLayer(nn.Module):
    """Pre-norm bidirectional Qwen3 block used by the lyric/timbre encoders, pooler and detokenizer."""

    def __init__(self, hidden_size: int, intermediate_size: int, num_attention_heads: int,
                 num_key_value_heads: int, head_dim: int, rms_norm_eps: float = 1e-6,
                 attention_bias: bool = False):
        super().__init__()
        self.input_layernorm = RMSNorm(hidden_size, eps=rms_norm_eps)
        self.self_attn = Attention(hidden_size, num_attention_heads, num_key_value_heads, head_dim,
                                   rms_norm_eps, attention_bias)
        self.post_attention_layernorm = RMSNorm(hidden_size, eps=rms_norm_eps)
        self.mlp = MLP(hidden_size, intermediate_size)

    def forward(self, x: torch.Tensor, rope, attn_mask: torch.Tensor | None) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), rope=rope, attn_mask=attn_mask)
        return x + self.mlp(self.post_attention_layernorm(x))


class EncoderStack(nn.Module):
    """``layers`` of :class:`EncoderLayer` followed by ``norm``, with RoPE over positions ``0..S-1``.

    Layer ``i`` uses the sliding window when ``layer_types[i] == "sliding_attention"`` (the official code indexes
    the DiT's ``layer_types`` list by the block's own layer index).
    """

    def __init__(self, num_layers: int, hidden_size: int, intermediate_size: int, num_attention_heads: int,
                 num_key_value_heads: int, head_dim: int, rms_norm_eps: float, attention_bias: bool,
                 rope_theta: float, sliding_window: int | None, layer_types: list[str]):
        super().__init__()
        self.layers = nn.ModuleList([
            EncoderLayer(hidden_size, intermediate_size, num_attention_heads, num_key_value_heads, head_dim,
                         rms_norm_eps, attention_bias)
            for _ in range(num_layers)
        ])
        self.norm = RMSNorm(hidden_size, eps=rms_norm_eps)
        self.head_dim = head_dim
        self.rope_theta = rope_theta
        self.sliding_window = sliding_window
        self.layer_types = list(layer_types[:num_layers])
        self.gradient_checkpointing = False

    def run_layers(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        seq = x.shape[1]
        rope = rotary_cos_sin(seq, self.head_dim, self.rope_theta, x.device, x.dtype)
        masks = {
            "full_attention": self_attention_mask(seq, x.device, None, mask),
            "sliding_attention": self_attention_mask(seq, x.device, self.sliding_window, mask),
        }
        for layer, kind in zip(self.layers, self.layer_types):
            if self.gradient_checkpointing and torch.is_grad_enabled():
                x = torch.utils.checkpoint.checkpoint(layer, x, rope, masks[kind], use_reentrant=False)
            else:
                x = layer(x, rope, masks[kind])
        return self.norm(x)
