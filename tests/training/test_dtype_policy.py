"""The dtype policy: float32 masters for what trains, the loaded dtype for what is frozen, at the released dtype
(bf16) and with frozen FP8 storage, where tiny float32 runs cannot see a mismatch."""

import pytest
import torch

from acestep_train import load_model
from acestep_train.training.dtype_policy import DtypePolicy
from acestep_train.training.module import AceStepModule
from train_helpers import ATTN_MLP, demo_batch as _demo_batch

LORA = dict(rank=4, alpha=4, targets=ATTN_MLP)


def _frozen_dtypes(module):
    return {p.dtype for p in module.model.parameters() if not p.requires_grad}


@pytest.mark.parametrize("mode", ["lora", "full"])
def test_bf16_model_trains_float32_masters_over_a_bf16_frozen_base(mode):
    bundle = load_model("tiny", dtype="bfloat16")
    module = AceStepModule(bundle, mode=mode, lora=LORA)
    assert module.dtypes == DtypePolicy(torch.bfloat16, dit_trained=mode == "full")
    assert {p.dtype for p in module.trainable_parameters()} == {torch.float32}
    assert _frozen_dtypes(module) == {torch.bfloat16}
    assert module.dtypes.sampler_dtypes() == {"dit": torch.float32 if mode == "full" else torch.bfloat16,
                                              "condition_encoder": torch.bfloat16}
    out = module.training_loss(_demo_batch())
    assert out.loss.dtype == torch.float32 and torch.isfinite(out.loss)
    out.loss.backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in module.trainable_parameters())


def test_frozen_fp8_feeds_its_layers_the_frozen_dtype():
    """FP8 is storage only: the condition encoder's inputs are cast to the frozen dtype, not to its weights' FP8."""
    module = AceStepModule(load_model("tiny"), mode="lora", lora=LORA, frozen_fp8=True)
    assert torch.float8_e4m3fn in _frozen_dtypes(module)
    assert module.dtypes.condition_encoder == torch.float32
    assert torch.isfinite(module.training_loss(_demo_batch()).loss)


def test_a_model_already_in_two_dtypes_is_refused():
    model = load_model("tiny").model
    model.decoder.to(torch.bfloat16)
    with pytest.raises(ValueError, match=r"holds parameters in \['torch.bfloat16', 'torch.float32'\]"):
        DtypePolicy.for_model(model, dit_trained=False)


def test_a_trainable_parameter_outside_the_policy_is_refused():
    policy = DtypePolicy(torch.bfloat16)
    with pytest.raises(TypeError, match=r"trainable parameters held in \['torch.bfloat16'\]"):
        policy.check_trained([torch.nn.Parameter(torch.zeros(2, dtype=torch.bfloat16))])
    policy.check_trained([torch.nn.Parameter(torch.zeros(2))])
