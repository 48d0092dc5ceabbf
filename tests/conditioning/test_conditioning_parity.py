"""A training batch is conditioned exactly as the sampler conditions a request with the same metadata."""

import torch

from acestep_train import load_model
from acestep_train.training.module import AceStepModule
from acestep_train.training.features import BundleEncoder
from acestep_train.inference import GenerationRequest
from acestep_train.inference.conditions import build_conditions
from datamodules.datamodule import AceStepDataModule
from datamodules.demo import make_demo_dataset
from datamodules.metadata import load_metadata


def test_training_conditioning_equals_sampler_conditioning(tmp_path):
    bundle = load_model("tiny")
    meta = make_demo_dataset(tmp_path / "songs", n=3, seconds=2.0, seed=5)
    rows = {r.id: r for r in load_metadata(meta)}
    dm = AceStepDataModule(meta, tmp_path / "cache", batch_size=3, max_duration=None, progress=False)
    dm.connect(BundleEncoder(bundle))
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    module = AceStepModule(bundle, mode="full")
    enc_train, mask_train = module.objective.conditions(module.model, module.silence_latent, batch)

    assert any("[verse]" in rows[i].lyrics for i in batch.ids), "real lyrics are compared, not only the tag"
    for i, sample_id in enumerate(batch.ids):
        row = rows[sample_id]
        request = GenerationRequest(prompt=row.prompt, lyrics=row.lyrics, bpm=row.bpm, keyscale=row.keyscale,
                                    timesignature=row.timesignature, vocal_language=row.vocal_language, duration=2.0)
        with torch.no_grad():
            enc_ref, mask_ref = build_conditions(bundle, [request])
        n = int(mask_ref.sum())
        assert int(mask_train[i].sum()) == n, sample_id
        torch.testing.assert_close(enc_train[i, :n], enc_ref[0, :n], rtol=1e-5, atol=1e-6)


def test_a_different_caption_changes_the_condition(tmp_path):
    """The comparison above can fail: one changed word in the caption moves the packed condition."""
    bundle = load_model("tiny")
    a = GenerationRequest(prompt="calm piano", duration=2.0)  # same byte length: only the content differs
    b = GenerationRequest(prompt="calm organ", duration=2.0)
    with torch.no_grad():
        ea, _ = build_conditions(bundle, [a])
        eb, _ = build_conditions(bundle, [b])
    assert not torch.allclose(ea, eb)
