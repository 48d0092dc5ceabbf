"""Training end to end on CPU with model=tiny: fast_dev_run, overfitting, exact resume, masking, what trains,
exports that reload, the run record, and loud failures."""

import json

import pytest
import torch

from acestep_train import load_model
from acestep_train.training.module import AceStepModule
from acestep_train.training.objective import ObjectiveConfig
from datamodules.demo import make_demo_dataset
from train_helpers import ATTN_MLP, batch_of as _batch, demo_batch as _demo_batch
from train_helpers import run_train, tiny_overrides, trained_state



@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    return {"metadata": make_demo_dataset(root / "songs", n=6, seconds=3.0, seed=0), "cache": root / "cache"}


def losses(run_dir):
    import csv

    rows = list(csv.DictReader(open(run_dir / "csv" / "metrics.csv")))
    return [float(r["train/loss"]) for r in rows if r.get("train/loss")]


def test_fast_dev_run(data, tmp_path):
    out = run_train(tmp_path, tiny_overrides(data, ["debug=fdr"]))
    assert out["output_dir"] == tmp_path
    assert (tmp_path / "run.json").is_file()


@pytest.mark.parametrize("mode,lr", [("lora", 1e-2), ("full", 3e-3)])
def test_overfit_one_batch(data, tmp_path, mode, lr):
    run_train(tmp_path, tiny_overrides(data, ["debug=overfit", f"mode={mode}", "trainer.max_epochs=80",
                                              f"mode.optimizer.lr={lr}", "callbacks.model_checkpoint=null"]))
    ls = losses(tmp_path)
    assert len(ls) == 80
    assert ls[-1] <= 0.1 * ls[0], f"loss went {ls[0]:.4f} -> {ls[-1]:.4f}"


def test_resume_is_bit_exact(data, tmp_path):
    """5 steps straight == the same run interrupted after step 2 (mid-epoch: 3 batches per epoch) and resumed
    from its last.ckpt. LoRA dropout is on, so the model's own RNG use must be reproduced too."""
    common = ["mode.lora.dropout=0.1", "callbacks.model_checkpoint.every_n_train_steps=1", "exports=[]",
              "trainer.max_steps=5"]
    run_train(tmp_path / "a", tiny_overrides(data, common))
    run_train(tmp_path / "b", tiny_overrides(data, common + ["+callbacks.stop._target_=train_helpers.StopAtStep",
                                                              "+callbacks.stop.step=2"]))
    ckpt_b = tmp_path / "b" / "checkpoints" / "last.ckpt"
    assert torch.load(ckpt_b, weights_only=True)["global_step"] == 2
    run_train(tmp_path / "c", tiny_overrides(data, common + [f"ckpt_path={ckpt_b}"]))
    a = trained_state(tmp_path / "a" / "checkpoints" / "last.ckpt")
    c = trained_state(tmp_path / "c" / "checkpoints" / "last.ckpt")
    b = trained_state(ckpt_b)
    assert a.keys() == c.keys() and all("lora_" in k for k in a)
    assert all(torch.equal(a[k], c[k]) for k in a), "resumed weights differ from the uninterrupted run"
    assert not all(torch.equal(a[k], b[k]) for k in a), "the resumed run did not train"
    assert losses(tmp_path / "a")[2:] == losses(tmp_path / "c")


def _loss(module, batch, generator):
    return module.objective(module.model, module.silence_latent, batch, generator).loss


@pytest.mark.parametrize("mode", ["lora", "full"])
def test_padding_cannot_change_loss_or_gradients(mode):
    torch.manual_seed(0)
    bundle = load_model("tiny")
    module = AceStepModule(bundle, mode=mode, lora=dict(rank=4, alpha=4, targets=ATTN_MLP),
                           objective=ObjectiveConfig(cfg_dropout=0.0))
    for p in module.trainable_parameters():  # LoRA B starts at zero; give every adapter a gradient path
        torch.nn.init.normal_(p, std=0.02)
    clip = torch.randn(1, 37, 8)
    text, lyric = torch.randn(1, 12, 32), torch.randn(1, 20, 32)
    results = []
    for pad in (0, 9, 40):  # the same clip padded two ways (and not at all), garbage in the padding
        x0 = torch.cat([clip, 100 * torch.randn(1, pad, 8)], dim=1)
        batch = _batch(x0, 37, [37], text, lyric)
        batch.latents[:, 37:] = 50.0  # padded frames hold garbage; the mask must hide it
        module.zero_grad()
        loss = _loss(module, batch, torch.Generator().manual_seed(3))
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in module.trainable_parameters()]))
    (l0, g0), *rest = results
    for loss, grads in rest:
        torch.testing.assert_close(loss, l0, rtol=1e-5, atol=1e-7)
        for a, b in zip(grads, g0):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)


def _train_steps(module, batch, n=3):
    opt = torch.optim.AdamW(module.trainable_parameters(), lr=1e-2)
    for i in range(n):
        loss = _loss(module, batch, torch.Generator().manual_seed(i))
        opt.zero_grad()
        loss.backward()
        opt.step()


def test_lora_mode_trains_only_adapters():
    module = AceStepModule(load_model("tiny"), mode="lora", lora=dict(rank=4, alpha=8, targets=ATTN_MLP))
    trainable = {n for n, p in module.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    before = {n: p.detach().clone() for n, p in module.named_parameters()}
    _train_steps(module, _demo_batch())
    changed = {n for n, p in module.named_parameters() if not torch.equal(p, before[n])}
    assert changed and changed <= trainable
    assert any(".lora_B." in n for n in changed)


def test_full_mode_trains_only_the_dit():
    module = AceStepModule(load_model("tiny"), mode="full")
    trainable = {n for n, p in module.named_parameters() if p.requires_grad}
    assert trainable == {n for n, _ in module.named_parameters() if n.startswith("model.decoder.")}
    before = {n: p.detach().clone() for n, p in module.named_parameters()}
    _train_steps(module, _demo_batch())
    changed = {n for n, p in module.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all(n.startswith("model.decoder.") for n in changed)


def _dropout_module():
    """LoRA dropout 0.5 and non-zero adapters: the forward draws from the global RNG and those draws matter."""
    module = AceStepModule(load_model("tiny"), mode="lora", lora=dict(rank=4, alpha=4, targets=ATTN_MLP, dropout=0.5))
    for p in module.trainable_parameters():
        torch.nn.init.normal_(p, std=0.05, generator=torch.Generator().manual_seed(0))
    return module


@pytest.mark.filterwarnings("ignore:You are trying to `self.log\\(\\)`")  # no Trainer here: nothing to log to
def test_a_training_step_leaves_the_global_rng_untouched():
    module, batch = _dropout_module(), _demo_batch()
    torch.manual_seed(123)
    before = torch.get_rng_state()
    module.training_step(batch, 0)
    assert torch.equal(torch.get_rng_state(), before), "a training step changed the global RNG state"
    assert module.batches_trained == 1


def test_dropout_inside_the_model_is_keyed_on_the_step_not_on_the_global_rng():
    module, batch = _dropout_module(), _demo_batch()
    losses = []
    for outside_seed in (1, 2):  # whatever the global RNG holds before the step...
        torch.manual_seed(outside_seed)
        module.batches_trained = 7
        losses.append(module.training_loss(batch).loss)
    assert torch.equal(losses[0], losses[1]), "...step 7 draws the same dropout masks"
    # Negative control: dropout does draw, so another key for the model RNG alone changes the loss.
    generators = module.objective.training_generators(7, len(batch))
    with module.objective.model_rng(8, 0, "cpu"):
        other = module.objective(module.model, module.silence_latent, batch, generators).loss
    assert not torch.equal(other, losses[0])


def test_non_finite_loss_stops_with_step_and_sample_ids():
    module = AceStepModule(load_model("tiny"), mode="full")
    batch = _demo_batch()
    batch.latents[1, 3, 0] = float("nan")
    with pytest.raises(FloatingPointError, match=r"non-finite loss \(nan\) at global step 0 .*item0, item1"):
        module.training_step(batch, 0)


def test_exports_reload_and_match_the_trained_model(data, tmp_path):
    from peft import PeftModel

    from acestep_train.lora import load_adapters

    run_train(tmp_path, tiny_overrides(data, ["trainer.max_steps=3", "mode.lora.rank=4", "mode.lora.alpha=8"]))
    ckpt = trained_state(tmp_path / "checkpoints" / "last.ckpt")
    exports = tmp_path / "exports"
    assert sorted(p.name for p in exports.iterdir()) == ["lora.safetensors", "lora_comfyui.safetensors",
                                                         "lora_diffsynth.safetensors", "peft"]
    # Reference: the in-training model = fresh tiny base + the checkpoint's adapter tensors.
    from acestep_train.lora.inject import apply_lora

    trained = load_model("tiny").model
    apply_lora(trained.decoder, rank=4, alpha=8, target_modules=r"layers\.\d+\.(self_attn|cross_attn)\.(q_proj|k_proj|v_proj|o_proj)")
    missing = trained.load_state_dict({k.removeprefix("model."): v for k, v in ckpt.items()}, strict=False)
    assert not missing.unexpected_keys
    g = torch.Generator().manual_seed(0)
    x, ctx = torch.randn(2, 21, 8, generator=g), torch.randn(2, 21, 16, generator=g)
    enc, t = torch.randn(2, 9, 64, generator=g), torch.tensor([0.3, 0.8])
    with torch.no_grad():
        ref = trained.decoder(x, t, t, enc, ctx)
        peft_dec = PeftModel.from_pretrained(load_model("tiny").model.decoder, str(exports / "peft"))
        assert torch.allclose(peft_dec(x, t, t, enc, ctx), ref, rtol=1e-5, atol=1e-6)
        for name in ("lora.safetensors", "lora_comfyui.safetensors", "lora_diffsynth.safetensors"):
            dec = load_model("tiny").model.decoder
            with load_adapters(dec, [(exports / name, 1.0)], fuse=False):
                assert torch.allclose(dec(x, t, t, enc, ctx), ref, rtol=1e-5, atol=1e-6), name


def test_full_export_reloads_through_the_model_loader(data, tmp_path):
    run_train(tmp_path, tiny_overrides(data, ["mode=full", "trainer.max_steps=2"]))
    folder = tmp_path / "exports" / "tiny-full-finetune"
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors", "silence_latent.pt"]
    from acestep_train.checkpoints.loading import build_acestep_model, arch_from_cfg
    from acestep_train.checkpoints.variants import model_config
    from omegaconf import OmegaConf

    arch = arch_from_cfg(OmegaConf.to_container(model_config("tiny"), resolve=True)["arch"])
    reloaded = build_acestep_model(arch, folder)  # strict: raises on any key mismatch
    ckpt = trained_state(tmp_path / "checkpoints" / "last.ckpt")
    for k, v in ckpt.items():
        assert torch.equal(reloaded.state_dict()[k.removeprefix("model.")], v), k


def test_run_record(data, tmp_path):
    run_train(tmp_path, tiny_overrides(data, ["debug=fdr"]))
    record = json.loads((tmp_path / "run.json").read_text())
    assert len(record["dataset_manifest_hash"]) == 64
    assert record["git_revision"] != ""
    assert "model:" in (tmp_path / "config.yaml").read_text()
