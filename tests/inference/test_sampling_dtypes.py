"""Each model component runs in its own dtype. Full fine-tuning of released bf16 weights upcasts only the DiT
(``model.decoder``) to float32; the condition encoder, the audio tokenizer and ``null_condition_emb`` stay bf16.
The sampler must feed each of them inputs in its own dtype (one dtype for the whole model crashed with
``mat1 and mat2 must have the same dtype``)."""

from __future__ import annotations

import pytest
import torch

from acestep_train import load_model
from acestep_train.inference import GenerationRequest, Sampler
from numerics import rel_err

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")
SRC = 0.2 * torch.randn(2, 48000 * 2, generator=torch.Generator().manual_seed(3))
# cfg guidance brings in null_condition_emb; cover brings in the tokenizer / detokenizer (hints).
REQUESTS = [GenerationRequest("lofi piano", duration=2.0, seed=1, cfg_scale=3.0, semantics="diffsynth"),
            GenerationRequest("techno", task_type="cover", src_audio=SRC, seed=2, cfg_scale=3.0, semantics="diffsynth")]


def _record_input_dtypes(module: torch.nn.Module, seen: list) -> torch.utils.hooks.RemovableHandle:
    return module.register_forward_pre_hook(
        lambda m, args: seen.append({a.dtype for a in args if isinstance(a, torch.Tensor) and a.is_floating_point()}))


def test_bf16_model_with_a_float32_dit_samples():
    bundle = load_model("tiny", dtype="bfloat16")
    bundle.model.decoder.float()  # what mode=full does to released weights
    assert bundle.model.null_condition_emb.dtype == torch.bfloat16
    assert next(bundle.model.encoder.parameters()).dtype == torch.bfloat16
    dit_in, enc_in = [], []
    hooks = [_record_input_dtypes(bundle.model.decoder, dit_in), _record_input_dtypes(bundle.model.encoder, enc_in)]
    try:
        out = Sampler(bundle)(REQUESTS, progress=False)
    finally:
        for h in hooks:
            h.remove()
    assert out.latents.dtype == torch.float32 and out.audio.dtype == torch.float32
    assert torch.isfinite(out.latents).all() and torch.isfinite(out.audio).all()
    assert dit_in and all(s == {torch.float32} for s in dit_in)
    assert enc_in and all(s == {torch.bfloat16} for s in enc_in)

    # The same weights with every component in float32 give the same tracks up to the bf16 encoders' rounding.
    bundle.model.float()
    ref = Sampler(bundle)(REQUESTS, progress=False)
    for i in range(len(REQUESTS)):
        f = out.frames[i]
        e = rel_err(out.latents[i, :f], ref.latents[i, :f])
        print(f"\n[bf16 encoders + fp32 DiT vs all fp32] item {i} latents rel err {e:.2e}")
        assert e < 1e-2
