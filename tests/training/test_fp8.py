"""Frozen FP8 storage (DiffSynth's --fp8_models): quarter the bytes of fp32, close outputs, adapters still train."""

import pytest
import torch

from acestep_train import load_model
from acestep_train.training.fp8 import Float8Linear
from acestep_train.training.module import AceStepModule

ATTN = r"layers\.\d+\.(self_attn|cross_attn)\.(q_proj|k_proj|v_proj|o_proj)"


def frozen_linear_bytes(model):
    return sum(m.weight.numel() * m.weight.element_size() for m in model.modules()
               if isinstance(m, torch.nn.Linear) and not m.weight.requires_grad)


def test_frozen_fp8_lora_module():
    torch.manual_seed(0)
    ref = AceStepModule(load_model("tiny"), mode="lora", lora=dict(rank=4, alpha=4, targets=ATTN))
    fp8 = AceStepModule(load_model("tiny"), mode="lora", lora=dict(rank=4, alpha=4, targets=ATTN), frozen_fp8=True)
    converted = [m for m in fp8.model.modules() if isinstance(m, Float8Linear)]
    assert converted and all(m.weight.dtype == torch.float8_e4m3fn for m in converted)
    assert frozen_linear_bytes(fp8.model.decoder) * 4 == frozen_linear_bytes(ref.model.decoder)
    # Adapters stay trainable full-precision modules; nothing trainable was converted.
    assert all(p.dtype == torch.float32 for p in fp8.trainable_parameters())

    g = torch.Generator().manual_seed(1)
    x, ctx = torch.randn(2, 20, 8, generator=g), torch.randn(2, 20, 16, generator=g)
    enc, t = torch.randn(2, 7, 64, generator=g), torch.tensor([0.2, 0.9])
    with torch.no_grad():
        a, b = ref.model.decoder(x, t, t, enc, ctx), fp8.model.decoder(x, t, t, enc, ctx)
    rel = (a - b).abs().max() / a.abs().max()
    assert 0 < rel < 0.1, f"fp8 storage moved the output by {rel:.3g} of its range"

    opt = torch.optim.AdamW(fp8.trainable_parameters(), lr=1e-2)
    before = {n: p.detach().clone() for n, p in fp8.named_parameters()}
    out = fp8.model.decoder(x, t, t, enc, ctx)
    out.pow(2).mean().backward()
    opt.step()
    changed = {n for n, p in fp8.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all(".lora_" in n for n in changed)


def test_frozen_fp8_refuses_full_mode_and_dora():
    with pytest.raises(ValueError, match="frozen_fp8 needs mode=lora"):
        AceStepModule(load_model("tiny"), mode="full", frozen_fp8=True)
    with pytest.raises(ValueError, match="DoRA"):
        AceStepModule(load_model("tiny"), mode="lora", lora=dict(rank=4, alpha=4, targets=ATTN, use_dora=True),
                      frozen_fp8=True)
