"""Frozen linear weights stored in FP8 (``float8_e4m3fn`` + one float32 scale per tensor), computed in the
input's dtype. Halves the memory of a frozen bf16 base under LoRA training (DiffSynth's ``--fp8_models``)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

FP8 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8).max  # 448


class Float8Linear(nn.Linear):
    """An ``nn.Linear`` whose (frozen) weight is held as FP8 with a per-tensor scale; dequantised per forward."""

    weight_scale: torch.Tensor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight.to(x.dtype) * self.weight_scale.to(x.dtype)
        return F.linear(x, w, None if self.bias is None else self.bias.to(x.dtype))


@torch.no_grad()
def store_frozen_linears_in_fp8(module: nn.Module) -> int:
    """Convert every frozen plain ``nn.Linear`` under ``module`` in place; trainable ones (LoRA A/B, a fully
    trained DiT) are left alone. Returns how many layers were converted."""
    n = 0
    for m in module.modules():
        if type(m) is not nn.Linear or m.weight.requires_grad:
            continue
        w = m.weight.detach().float()
        scale = (w.abs().max() / FP8_MAX).clamp_min(torch.finfo(torch.float32).tiny)
        m.weight = nn.Parameter((w / scale).to(FP8), requires_grad=False)
        m.register_buffer("weight_scale", scale.reshape(()), persistent=False)
        m.__class__ = Float8Linear
        n += 1
    return n
