"""LoRA injection for training: only adapter parameters train, targets are checked, adapters read out, merge."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from acestep_train.lora import (LoraError, adapter_names, adapter_state_dict, apply_lora, export_lora, get_spec,
                                merge_adapters, remove_adapters, restore_adapter, set_adapter_strength,
                                trainable_report, unmerge_adapters)
from acestep_train.models import AceStepConfig, AceStepModel
from acestep_train.models.dit import AceStepDiT
from numerics import rel_err

REPO = Path(__file__).resolve().parents[2]
PRESETS = OmegaConf.to_container(
    OmegaConf.load(REPO / "acestep_train" / "conf" / "_model_lora_targets.yaml").lora_targets)
ATTN = PRESETS["attention"]
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            head_dim=16, sliding_window=4, text_hidden_dim=32, num_lyric_encoder_hidden_layers=1,
            num_timbre_encoder_hidden_layers=1, num_attention_pooler_hidden_layers=1, fsq_dim=64)
CFG = AceStepConfig(**TINY)


def make_model(seed: int = 0) -> AceStepModel:
    torch.manual_seed(seed)
    return AceStepModel(CFG).eval()


def inputs(batch: int = 2, frames: int = 12, tokens: int = 7, seed: int = 3):
    g = torch.Generator().manual_seed(seed)
    t = torch.rand(batch, generator=g)
    return (torch.randn(batch, frames, CFG.audio_acoustic_hidden_dim, generator=g), t, t,
            torch.randn(batch, tokens, CFG.encoder_width, generator=g),
            torch.randn(batch, frames, 2 * CFG.audio_acoustic_hidden_dim, generator=g))


def randomize_adapter(decoder, adapter_name: str = "default", seed: int = 5) -> None:
    """Non-zero B (PEFT initialises it to 0) so that the adapter changes the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in decoder.named_parameters():
            if f".{adapter_name}" in n and ("lora_" in n or "lokr_" in n):
                p.copy_(0.2 * torch.randn(p.shape, generator=g))


@pytest.mark.parametrize("preset,per_layer", [("attention", 8), ("attention_mlp", 11), ("self_attention", 4),
                                              ("cross_attention", 4)])
def test_presets_target_the_right_modules(preset, per_layer):
    model = make_model()
    modules = apply_lora(model.decoder, rank=4, alpha=8, target_modules=PRESETS[preset])
    assert len(modules) == per_layer * CFG.num_hidden_layers
    assert all(m.startswith("layers.") for m in modules)


def test_lora_mode_trains_only_adapter_params():
    model = make_model()
    base = {k: v.clone() for k, v in model.state_dict().items()}
    x = inputs()
    with torch.no_grad():
        ref = model.decoder(*x)
    modules = apply_lora(model, rank=4, alpha=8, dropout=0.1, target_modules=ATTN)
    dec = model.decoder
    assert type(dec) is AceStepDiT  # injected in place, same class and forward signature
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A.default." in n or ".lora_B.default." in n for n in trainable)
    expected = sum(4 * (dec.get_submodule(m).in_features + dec.get_submodule(m).out_features) for m in modules)
    rep = trainable_report(model)
    assert rep.trainable == rep.adapter == expected and rep.other_trainable == []
    assert f"{expected:,}" in str(rep)
    # B starts at zero: the adapted model is the base model until trained (eval: no dropout).
    with torch.no_grad():
        assert torch.equal(dec(*x), ref)
    # One optimiser step moves adapter weights only.
    dec.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    dec(*x).pow(2).mean().backward()
    assert all(p.grad is None for n, p in model.named_parameters() if not p.requires_grad)
    opt.step()
    sd = model.state_dict()
    for k, v in base.items():
        key = k
        if k.startswith("decoder.") and k[len("decoder."):].rsplit(".", 1)[0] in modules:
            key = k.rsplit(".", 1)[0] + ".base_layer." + k.rsplit(".", 1)[1]
        assert torch.equal(sd[key], v), k
    assert any(not torch.equal(sd[f"decoder.{m}.lora_B.default.weight"], torch.zeros_like(
        sd[f"decoder.{m}.lora_B.default.weight"])) for m in modules)


def test_state_dict_keys_are_predictable():
    dec = make_model().decoder
    apply_lora(dec, rank=4, alpha=8, target_modules=ATTN)
    keys = set(dec.state_dict())
    assert {"layers.0.self_attn.q_proj.base_layer.weight", "layers.0.self_attn.q_proj.lora_A.default.weight",
            "layers.0.self_attn.q_proj.lora_B.default.weight", "layers.1.cross_attn.o_proj.lora_B.default.weight",
            "layers.0.mlp.gate_proj.weight"} <= keys
    sd = adapter_state_dict(dec)
    want = {f"layers.{i}.{a}.{p}.lora_{ab}.weight" for i in range(2) for a in ("self_attn", "cross_attn")
            for p in ("q_proj", "k_proj", "v_proj", "o_proj") for ab in "AB"}
    assert set(sd) == want
    assert sd["layers.0.self_attn.q_proj.lora_A.weight"].shape == (4, 64)
    assert sd["layers.0.self_attn.k_proj.lora_B.weight"].shape == (CFG.num_key_value_heads * CFG.head_dim, 4)
    # copies, not views of the live parameters
    sd["layers.0.self_attn.q_proj.lora_A.weight"].add_(1)
    assert not torch.equal(sd["layers.0.self_attn.q_proj.lora_A.weight"],
                           dec.layers[0].self_attn.q_proj.lora_A["default"].weight)


def test_list_targets_use_peft_suffix_rule():
    dec = make_model().decoder
    modules = apply_lora(dec, rank=2, alpha=2, target_modules=["q_proj", "layers.1.mlp.down_proj"])
    assert modules == ["layers.0.self_attn.q_proj", "layers.0.cross_attn.q_proj", "layers.1.self_attn.q_proj",
                       "layers.1.cross_attn.q_proj", "layers.1.mlp.down_proj"]


def test_zero_match_refuses_with_pattern_and_names():
    dec = make_model().decoder
    with pytest.raises(LoraError, match=r"matches no module") as e:
        apply_lora(dec, rank=4, alpha=8, target_modules=r"blocks\.\d+\.attn\.qkv")
    msg = str(e.value)
    assert r"blocks\.\d+\.attn\.qkv" in msg and "layers.0.self_attn.q_proj" in msg
    with pytest.raises(LoraError, match="matches no module"):
        apply_lora(dec, rank=4, alpha=8, target_modules="attention")  # a preset name is no regex
    with pytest.raises(LoraError, match="not nn.Linear"):
        apply_lora(dec, rank=4, alpha=8, target_modules=r"layers\.\d+\.self_attn")
    with pytest.raises(LoraError, match="not a valid regular expression"):
        apply_lora(dec, rank=4, alpha=8, target_modules="layers.(")
    assert adapter_names(dec) == []


def test_refuses_without_peft(monkeypatch):
    monkeypatch.setitem(sys.modules, "peft", None)
    with pytest.raises(ImportError, match="need PEFT"):
        apply_lora(make_model().decoder, rank=4, alpha=8, target_modules=ATTN)


def test_merge_unmerge_and_remove():
    model = make_model()
    dec = model.decoder
    w0 = dec.layers[0].self_attn.q_proj.weight.detach().clone()
    apply_lora(dec, rank=4, alpha=8, target_modules=ATTN)
    randomize_adapter(dec)
    x = inputs()
    with torch.no_grad():
        live = dec(*x)
        layer = dec.layers[0].self_attn.q_proj
        A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
        assert merge_adapters(dec) == 16
        assert torch.allclose(layer.base_layer.weight, w0 + 2.0 * B @ A, atol=1e-6)
        assert rel_err(dec(*x), live) < 1e-5
        unmerge_adapters(dec)
        assert torch.allclose(layer.base_layer.weight, w0, atol=1e-6)
        assert rel_err(dec(*x), live) < 1e-6
        remove_adapters(dec, merge=True)
        assert set(model.state_dict()) == set(make_model().state_dict())  # released key names again
        assert rel_err(dec(*x), live) < 1e-5
    assert adapter_names(dec) == []


def test_two_adapters_and_strength():
    dec = make_model().decoder
    x = inputs()
    with torch.no_grad():
        base = dec(*x)
    apply_lora(dec, rank=4, alpha=8, target_modules=ATTN, adapter_name="a")
    randomize_adapter(dec, "a", seed=1)
    with torch.no_grad():
        only_a = dec(*x)
    apply_lora(dec, rank=2, alpha=2, target_modules=PRESETS["self_attention"], adapter_name="b")
    assert adapter_names(dec) == ["a", "b"]
    trainable = [n for n, p in dec.named_parameters() if p.requires_grad]
    assert trainable and all(".b." in n for n in trainable)  # only the new adapter trains
    with torch.no_grad():
        assert rel_err(dec(*x), only_a) < 1e-6  # b starts at zero, a stays active
        set_adapter_strength(dec, 0.0, "a")
        assert rel_err(dec(*x), base) < 1e-6
        set_adapter_strength(dec, 1.0, "a")
        assert rel_err(dec(*x), only_a) < 1e-6
    with pytest.raises(LoraError, match="already has an adapter"):
        apply_lora(dec, rank=2, alpha=2, target_modules=ATTN, adapter_name="a")


@pytest.mark.parametrize("variant", ["dora", "lokr"])
def test_dora_and_lokr_round_trip_as_live_adapters(variant, tmp_path):
    kw = dict(use_dora=True) if variant == "dora" else dict(kind="lokr")
    dec = make_model().decoder
    apply_lora(dec, rank=4, alpha=8, target_modules=ATTN, **kw)
    randomize_adapter(dec)
    x = inputs()
    with torch.no_grad():
        live = dec(*x)
    sd = adapter_state_dict(dec)
    assert get_spec(dec).variant == variant
    for fmt, path in (("acestep", tmp_path / "a.safetensors"), ("peft", tmp_path / "peft")):
        export_lora(dec, path, fmt, variant="turbo")
        other = make_model().decoder
        spec = restore_adapter(other, path)
        assert spec.variant == variant and spec.targets == ATTN
        back = adapter_state_dict(other)
        assert set(back) == set(sd) and all(torch.equal(back[k], sd[k]) for k in sd)
        with torch.no_grad():
            assert rel_err(other(*x), live) < 1e-6
    from peft import PeftModel

    pm = PeftModel.from_pretrained(make_model().decoder, str(tmp_path / "peft"))  # the PEFT folder is standard
    with torch.no_grad():
        assert rel_err(pm(*x), live) < 1e-6
    with pytest.raises(LoraError, match="plain LoRA only"):
        export_lora(dec, tmp_path / "c.safetensors", "comfyui")


def test_restore_for_resume_is_trainable(tmp_path):
    dec = make_model().decoder
    apply_lora(dec, rank=4, alpha=8, target_modules=ATTN)
    randomize_adapter(dec)
    export_lora(dec, tmp_path / "ckpt.safetensors", provenance={"step": 10})
    other = make_model().decoder
    restore_adapter(other, tmp_path / "ckpt.safetensors", trainable=True)
    rep = trainable_report(other)
    assert rep.trainable == rep.adapter == trainable_report(dec).adapter and rep.other_trainable == []


def test_bf16_base_keeps_fp32_adapters():
    model = make_model().to(torch.bfloat16)
    apply_lora(model, rank=4, alpha=8, target_modules=ATTN)
    assert {p.dtype for p in model.parameters() if p.requires_grad} == {torch.float32}
    out = model.decoder(*(t.bfloat16() for t in inputs()))
    assert out.dtype == torch.bfloat16
    out.float().pow(2).mean().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in model.parameters() if p.requires_grad)


def test_2b_parameter_count_matches_published_log():
    """docs/training.md §6: r=64 on q/k/v/o of self + cross attention of the 2B DiT = 44,040,192 (#233)."""
    with torch.device("meta"):
        dec = AceStepDiT(AceStepConfig())
        apply_lora(dec, rank=64, alpha=128, target_modules=ATTN)
    assert trainable_report(dec).trainable == 44_040_192
