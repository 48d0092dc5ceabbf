"""The optimizer presets (``mode/optimizer=adamw|adafactor|adamw8bit``): each composes with each mode, keeps the mode's
learning rate, and takes a real training step on the tiny model (finite loss, the trained weights move, nothing
frozen moves). A missing optional package stops the startup checks with one line."""

import sys

import pytest
import torch

from acestep_train import load_model
from acestep_train.training import optimizers
from acestep_train.training.builders import build_module
from datamodules.batch import Batch
from train_helpers import compose_train

MODE_LR = {"lora": 1.0e-4, "dora": 1.0e-4, "full": 1.0e-5}
PRESET_CLASS = {"adamw": "AdamW", "adafactor": "Adafactor", "adamw8bit": "AdamW8bit"}


def compose(tmp_path, *overrides):
    return compose_train(tmp_path, ["model=tiny", "data.metadata=x.csv", *overrides])


def demo_batch() -> Batch:
    g = torch.Generator().manual_seed(1)
    lengths = [30, 22]
    mask = torch.zeros(2, 30, dtype=torch.bool)
    for i, n in enumerate(lengths):
        mask[i, :n] = True
    text, lyric = torch.randn(2, 10, 32, generator=g), torch.randn(2, 14, 32, generator=g)
    return Batch(latents=torch.randn(2, 30, 8, generator=g) * mask[..., None], latent_mask=mask, text_hidden=text,
                 text_mask=torch.ones(text.shape[:2], dtype=torch.bool), lyric_embeds=lyric,
                 lyric_mask=torch.ones(lyric.shape[:2], dtype=torch.bool), ids=["a", "b"])


def one_step(cfg):
    """Build the module exactly as training does and take optimizer steps with the preset; return what moved."""
    module = build_module(cfg, load_model("tiny"))
    opt = module.optimizer_factory(module.trainable_parameters())
    before = {n: p.detach().clone() for n, p in module.named_parameters()}
    losses = []
    for step in range(2):  # LoRA B starts at zero: A gets its first gradient on the second step
        loss = module.objective(module.model, module.silence_latent, demo_batch(),
                                torch.Generator().manual_seed(step)).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    moved = {n for n, p in module.named_parameters() if not torch.equal(p, before[n])}
    trainable = {n for n, p in module.named_parameters() if p.requires_grad}
    return opt, losses, moved, trainable


@pytest.mark.parametrize("mode", sorted(MODE_LR))
@pytest.mark.parametrize("preset", sorted(PRESET_CLASS))
def test_every_preset_composes_with_every_mode_and_keeps_its_lr(preset, mode, tmp_path):
    cfg = compose(tmp_path, f"mode={mode}", f"mode/optimizer={preset}")
    assert cfg.mode.optimizer.lr == MODE_LR[mode]
    assert cfg.mode.optimizer._partial_ is True
    assert PRESET_CLASS[preset].lower() in cfg.mode.optimizer._target_.lower()


def test_default_preset_is_adamw_with_todays_values(tmp_path):
    cfg = compose(tmp_path)
    assert dict(cfg.mode.optimizer) == {"_target_": "torch.optim.AdamW", "_partial_": True, "weight_decay": 0.01,
                                        "lr": 1.0e-4}


@pytest.mark.parametrize("mode", ["lora", "full"])
def test_adafactor_trains_a_step(mode, tmp_path):
    cfg = compose(tmp_path, f"mode={mode}", "mode/optimizer=adafactor", "mode.lora.rank=2" if mode == "lora" else
                  "mode.gradient_checkpointing=false")
    opt, losses, moved, trainable = one_step(cfg)
    assert type(opt) is torch.optim.Adafactor and opt.param_groups[0]["lr"] == MODE_LR[mode]
    assert all(torch.isfinite(torch.tensor(losses)))
    assert moved and moved <= trainable  # the trained weights move, nothing frozen does
    if mode == "lora":
        assert any(".lora_A." in n for n in moved) and any(".lora_B." in n for n in moved)


def test_adamw8bit_trains_a_step_with_8bit_state(tmp_path):
    pytest.importorskip("bitsandbytes")
    cfg = compose(tmp_path, "mode=full", "mode/optimizer=adamw8bit", "mode.gradient_checkpointing=false")
    opt, losses, moved, trainable = one_step(cfg)
    assert type(opt).__name__ == "AdamW8bit" and all(torch.isfinite(torch.tensor(losses)))
    assert moved and moved <= trainable
    # bitsandbytes keeps 32-bit state for small tensors; the tiny DiT's larger matrices get the 8-bit moments.
    assert any(s.get("state1") is not None and s["state1"].dtype == torch.uint8 for s in opt.state.values())


def test_adamw8bit_without_bitsandbytes_stops_at_startup_with_one_line(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import bitsandbytes -> ImportError
    cfg = compose(tmp_path, "mode/optimizer=adamw8bit")
    with pytest.raises(optimizers.OptimizerUnavailable) as e:
        optimizers.check_available(cfg.mode.optimizer)
    assert "\n" not in str(e.value) and "pip install" in str(e.value) and "adamw8bit" in str(e.value)
    optimizers.check_available(compose(tmp_path, "mode/optimizer=adafactor").mode.optimizer)  # torch ships it
