"""Unfused adapters are PEFT adapters: per-module ranks and scales (rank_pattern / alpha_pattern), PEFT's scaling as
the strength, removal back to the released module structure, and nothing else of the model touched (requires_grad,
the global RNG). Outputs are compared with merged weights computed here in float64, independently of our code."""

from __future__ import annotations

import pytest
import torch

from acestep_train.lora import (LoraDelta, LoraError, adapter_names, apply_lora, delete_adapter, load_adapters,
                                trainable_report)
from acestep_train.models import AceStepConfig, AceStepModel
from numerics import rel_err

TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            head_dim=16, sliding_window=4, text_hidden_dim=32, num_lyric_encoder_hidden_layers=1,
            num_timbre_encoder_hidden_layers=1, num_attention_pooler_hidden_layers=1, fsq_dim=64)
CFG = AceStepConfig(**TINY)
ATTN = r"layers\.\d+\.(self_attn|cross_attn)\.(q_proj|k_proj|v_proj|o_proj)"
TOL = 1e-5


def fresh_decoder():
    torch.manual_seed(0)
    return AceStepModel(CFG).eval().decoder


def run(decoder) -> torch.Tensor:
    g = torch.Generator().manual_seed(3)
    t = torch.rand(2, generator=g)
    x = (torch.randn(2, 12, 64, generator=g), t, t, torch.randn(2, 7, CFG.encoder_width, generator=g),
         torch.randn(2, 12, 128, generator=g))
    with torch.no_grad():
        return decoder(*x)


def merged(weights: dict[str, LoraDelta], strength: float = 1.0):
    """Reference decoder with ``W + strength · scale · B @ A`` (float64 product)."""
    dec = fresh_decoder()
    sd = dec.state_dict()
    for p, w in weights.items():
        sd[f"{p}.weight"] = (sd[f"{p}.weight"].double() + strength * w.scale * (w.B.double() @ w.A.double())).float()
    dec.load_state_dict(sd)
    return dec


def mixed_weights(seed: int = 0) -> dict[str, LoraDelta]:
    """Ranks 2 / 4 / 8 and three different scales across the modules of one adapter."""
    g = torch.Generator().manual_seed(seed)
    dec = fresh_decoder()
    out = {}
    for i, (p, rank, scale) in enumerate([("layers.0.self_attn.q_proj", 4, 2.0), ("layers.0.self_attn.o_proj", 4, 2.0),
                                          ("layers.1.self_attn.q_proj", 2, 0.5), ("layers.1.mlp.down_proj", 8, 2.0),
                                          ("layers.1.cross_attn.v_proj", 4, 0.1)]):
        lin = dec.get_submodule(p)
        out[p] = LoraDelta(0.3 * torch.randn(rank, lin.in_features, generator=g),
                           0.3 * torch.randn(lin.out_features, rank, generator=g), scale)
    return out


def test_per_module_ranks_and_scales_become_one_peft_adapter():
    weights = mixed_weights()
    dec = fresh_decoder()
    handle = load_adapters(dec, [(weights, 0.8)])
    assert adapter_names(dec) == ["loaded_0"]
    for p, w in weights.items():
        layer = dec.get_submodule(p)
        assert layer.r["loaded_0"] == w.rank and layer.scaling["loaded_0"] == w.scale * 0.8
        assert torch.equal(layer.lora_A["loaded_0"].weight, w.A) and not layer.lora_A["loaded_0"].weight.requires_grad
    assert dec.peft_config["loaded_0"].rank_pattern  # the ranks really differ per module
    assert rel_err(run(dec), run(merged(weights, 0.8))) <= TOL
    handle.set_strength(0, -1.5)
    assert rel_err(run(dec), run(merged(weights, -1.5))) <= TOL


def test_remove_restores_the_released_module_structure():
    plain = fresh_decoder()
    keys, base = set(plain.state_dict()), run(plain)
    dec = fresh_decoder()
    with load_adapters(dec, [mixed_weights(1), mixed_weights(2)]) as handle:
        assert adapter_names(dec) == ["loaded_0", "loaded_1"]
        assert any(k.endswith(".base_layer.weight") for k in dec.state_dict())
        handle.remove(0)
        assert adapter_names(dec) == ["loaded_1"]
        assert rel_err(run(dec), run(merged(mixed_weights(2)))) <= TOL
    assert set(dec.state_dict()) == keys and not hasattr(dec, "peft_config")
    assert torch.equal(run(dec), base)
    with pytest.raises(LoraError, match="no adapter named"):
        delete_adapter(dec, "loaded_0")


def test_loading_touches_neither_gradients_nor_the_rng():
    """Beside a trainable adapter: it keeps training, the loaded one is frozen, no random numbers are drawn (PEFT
    would initialise the new layers), and removing the loaded adapter leaves the trainable one in place."""
    dec = fresh_decoder()
    apply_lora(dec, rank=2, alpha=2, target_modules=ATTN)
    before, weights = trainable_report(dec), mixed_weights()
    rng = torch.random.get_rng_state()
    with load_adapters(dec, [weights]):
        assert torch.equal(torch.random.get_rng_state(), rng)
        after = trainable_report(dec)
        assert (after.trainable, after.other_trainable) == (before.trainable, [])
        assert after.frozen_adapter == sum(w.A.numel() + w.B.numel() for w in weights.values())
    assert adapter_names(dec) == ["default"] and trainable_report(dec).trainable == before.trainable
    assert dec.layers[0].self_attn.q_proj.active_adapters == ["default"]
