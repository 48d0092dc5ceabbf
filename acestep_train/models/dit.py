"""The ACE-Step 1.5 diffusion transformer (checkpoint prefix ``decoder.``), ``docs/architecture.md`` §4."""

from __future__ import annotations

import math
from contextlib import nullcontext

import torch
import torch.nn.functional as F
from torch import nn

from acestep_train.models.config import AceStepConfig
from acestep_train.models.layers import (MLP, Attention, RMSNorm, Transpose, cross_attention_mask, rotary_cos_sin,
                     self_attention_mask)

CrossKV = list[tuple[torch.Tensor, torch.Tensor]]


class TimestepEmbedding(nn.Module):
    """Sinusoid of ``t * scale`` (cos first) -> MLP -> ``temb [B,H]`` and the AdaLN projection ``[B,6,H]``."""

    def __init__(self, in_channels: int, time_embed_dim: int, scale: float = 1000.0):
        super().__init__()
        self.in_channels = in_channels
        self.scale = scale
        self.linear_1 = nn.Linear(in_channels, time_embed_dim)
        self.linear_2 = nn.Linear(time_embed_dim, time_embed_dim)
        self.time_proj = nn.Linear(time_embed_dim, 6 * time_embed_dim)

    def sinusoid(self, t: torch.Tensor) -> torch.Tensor:
        # The official code scales t in t's own dtype (bf16 at inference), then takes fp32 frequencies.
        ts = t * self.scale
        half = self.in_channels // 2
        freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
        args = ts[:, None].float() * freqs[None]
        return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)

    def forward(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        temb = self.linear_2(F.silu(self.linear_1(self.sinusoid(t).to(t.dtype))))
        proj = self.time_proj(F.silu(temb)).unflatten(1, (6, -1))
        return temb, proj


class DiTLayer(nn.Module):
    """AdaLN-modulated gated self-attention, plain cross-attention, AdaLN-modulated gated SwiGLU MLP."""

    def __init__(self, cfg: AceStepConfig, layer_idx: int):
        super().__init__()
        h = cfg.hidden_size
        self.self_attn_norm = RMSNorm(h, cfg.rms_norm_eps)
        self.self_attn = Attention(h, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim,
                                   cfg.rms_norm_eps, cfg.attention_bias)
        self.cross_attn_norm = RMSNorm(h, cfg.rms_norm_eps)
        self.cross_attn = Attention(h, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim,
                                    cfg.rms_norm_eps, cfg.attention_bias, is_cross_attention=True)
        self.mlp_norm = RMSNorm(h, cfg.rms_norm_eps)
        self.mlp = MLP(h, cfg.intermediate_size)
        self.scale_shift_table = nn.Parameter(torch.randn(1, 6, h) / h**0.5)
        self.attention_type = cfg.layer_types[layer_idx]

    def forward(self, x, proj, rope, self_mask, enc, cross_mask, cross_kv=None):
        shift, scale, gate, c_shift, c_scale, c_gate = (self.scale_shift_table + proj).chunk(6, dim=1)
        h = (self.self_attn_norm(x) * (1 + scale) + shift).type_as(x)
        x = (x + self.self_attn(h, rope=rope, attn_mask=self_mask) * gate).type_as(x)
        h = self.cross_attn_norm(x).type_as(x)
        x = x + self.cross_attn(h, kv_input=enc, kv=cross_kv, attn_mask=cross_mask)
        h = (self.mlp_norm(x) * (1 + c_scale) + c_shift).type_as(x)
        return (x + self.mlp(h) * c_gate).type_as(x)


class AceStepDiT(nn.Module):
    """Velocity predictor over 25 Hz VAE latents.

    ``forward(x_t, t, r, encoder_hidden_states, context_latents)`` returns ``v = noise - x0`` with the shape
    of ``x_t``. Optional boolean masks (True = valid) hide padded latent frames (``attention_mask [B,T]``) and
    padded condition tokens (``encoder_attention_mask [B,L]``); padded frames are also zeroed at the input so
    that their content cannot reach valid frames through a shared patch.
    """

    def __init__(self, cfg: AceStepConfig):
        super().__init__()
        h = cfg.hidden_size
        self.cfg = cfg
        self.patch_size = cfg.patch_size
        self.layers = nn.ModuleList([DiTLayer(cfg, i) for i in range(cfg.num_hidden_layers)])
        self.proj_in = nn.Sequential(Transpose(), nn.Conv1d(cfg.in_channels, h, cfg.patch_size, cfg.patch_size),
                                     Transpose())
        self.time_embed = TimestepEmbedding(256, h)
        self.time_embed_r = TimestepEmbedding(256, h)
        self.condition_embedder = nn.Linear(cfg.encoder_width, h)
        self.norm_out = RMSNorm(h, cfg.rms_norm_eps)
        self.proj_out = nn.Sequential(
            Transpose(), nn.ConvTranspose1d(h, cfg.audio_acoustic_hidden_dim, cfg.patch_size, cfg.patch_size),
            Transpose())
        self.scale_shift_table = nn.Parameter(torch.randn(1, 2, h) / h**0.5)
        self.gradient_checkpointing = False
        # Offload activations saved for backward to CPU (with or without checkpointing).
        self.offload_activations = False

    def embed_condition(self, encoder_hidden_states: torch.Tensor) -> torch.Tensor:
        return self.condition_embedder(encoder_hidden_states)

    def cross_kv(self, encoder_hidden_states: torch.Tensor) -> CrossKV:
        """Per-layer cross-attention keys/values of a condition that stays constant over sampling steps."""
        enc = self.embed_condition(encoder_hidden_states)
        return [layer.cross_attn.project_kv(enc) for layer in self.layers]

    def token_mask(self, attention_mask: torch.Tensor | None, n_tokens: int) -> torch.Tensor | None:
        """A patch token is valid when any of its frames is valid (frames are padded at the end)."""
        if attention_mask is None:
            return None
        m = attention_mask.to(torch.bool)
        pad = n_tokens * self.patch_size - m.shape[1]
        if pad:
            m = F.pad(m, (0, pad), value=False)
        return m.view(m.shape[0], n_tokens, self.patch_size).any(-1)

    def forward(
        self,
        hidden_states: torch.Tensor,
        timestep: torch.Tensor,
        timestep_r: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None,
        context_latents: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        encoder_attention_mask: torch.Tensor | None = None,
        cross_kv: CrossKV | None = None,
    ) -> torch.Tensor:
        if hidden_states.shape[:2] != context_latents.shape[:2]:
            raise ValueError(f"hidden_states {tuple(hidden_states.shape)} and context_latents "
                             f"{tuple(context_latents.shape)} disagree on batch/time")
        temb_t, proj_t = self.time_embed(timestep)
        temb_r, proj_r = self.time_embed_r(timestep - timestep_r)
        temb, proj = temb_t + temb_r, proj_t + proj_r

        x = torch.cat([context_latents, hidden_states], dim=-1)
        if attention_mask is not None:
            x = x * attention_mask[..., None].to(x.dtype)
        n_frames = x.shape[1]
        if n_frames % self.patch_size:
            x = F.pad(x, (0, 0, 0, self.patch_size - n_frames % self.patch_size))
        x = self.proj_in(x)
        n_tok = x.shape[1]

        enc = None if cross_kv is not None else self.embed_condition(encoder_hidden_states)
        rope = rotary_cos_sin(n_tok, self.cfg.head_dim, self.cfg.rope_theta, x.device, x.dtype)
        tok_mask = self.token_mask(attention_mask, n_tok)
        self_masks = {
            "full_attention": self_attention_mask(n_tok, x.device, None, tok_mask),
            "sliding_attention": self_attention_mask(n_tok, x.device, self.cfg.sliding_window, tok_mask),
        }
        cross_mask = cross_attention_mask(encoder_attention_mask)

        offload = torch.autograd.graph.save_on_cpu(pin_memory=x.is_cuda) if (
            self.offload_activations and torch.is_grad_enabled()) else nullcontext()
        with offload:
            for i, layer in enumerate(self.layers):
                args = (x, proj, rope, self_masks[layer.attention_type], enc, cross_mask,
                        None if cross_kv is None else cross_kv[i])
                if self.gradient_checkpointing and torch.is_grad_enabled():
                    x = torch.utils.checkpoint.checkpoint(layer, *args, use_reentrant=False)
                else:
                    x = layer(*args)

        shift, scale = (self.scale_shift_table + temb[:, None, :]).chunk(2, dim=1)
        x = (self.norm_out(x) * (1 + scale) + shift).type_as(x)
        return self.proj_out(x)[:, :n_frames]
