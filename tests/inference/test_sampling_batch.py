"""Batching and the per-generation caches: several prompts/seeds/lengths in one batch equal the items run alone;
conditional and unconditional rows go through one DiT forward per step; cross-attention K/V are computed once per
generation (again only at a cover -> text2music switch)."""

from __future__ import annotations

import pytest
import torch

from acestep_train.inference import GenerationRequest
from numerics import rel_err

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")
# diffsynth semantics: no 128-frame minimum, so a few seconds keep the test cheap; batching is the same code path.
META = dict(bpm=128, keyscale="F# minor", timesignature="4", semantics="diffsynth")
NOISE = 1e-5  # batched vs alone: different padding and batch shapes, same math


class Calls:
    """Counts DiT forwards (with their batch size) and cross-K/V computations."""

    def __init__(self, bundle, monkeypatch):
        self.forwards, self.kv = [], 0
        dit = bundle.model.decoder
        self.hook = dit.register_forward_hook(lambda m, args, out: self.forwards.append(args[0].shape[0]))
        original = dit.cross_kv

        def counting(enc):
            self.kv += 1
            return original(enc)

        monkeypatch.setattr(dit, "cross_kv", counting)


@pytest.mark.parametrize("guidance", [None, "apg"])
def test_batch_equals_items_alone(sampler, guidance):
    # Different lengths (odd and even frame counts), captions, lyrics and seeds: padded frames and padded condition
    # tokens are hidden by the DiT's masks, so each item equals its unbatched run.
    g = dict(guidance=guidance, cfg_scale=3.0) if guidance else dict(cfg_scale=1.0)
    reqs = [GenerationRequest("lofi piano", duration=2.52, seed=1, **g, **META),
            GenerationRequest("industrial techno with a long description of the drums", lyrics="[verse]\nhey " * 12,
                              duration=3.0, seed=2, **g, **META),
            GenerationRequest("lofi piano", duration=2.0, seed=3, **g, **META)]
    batch = sampler(reqs, progress=False)
    assert batch.frames == [63, 75, 50] and batch.audio.shape == (3, 2, 75 * 1920)
    for i, r in enumerate(reqs):
        alone = sampler(r, progress=False)
        f, n = batch.frames[i], batch.lengths[i]
        assert rel_err(batch.latents[i, :f], alone.latents[0]) < NOISE
        assert rel_err(batch.audio[i, :, :n], alone.audio[0]) < NOISE
        assert not batch.latents[i, f:].any() and not batch.audio[i, :, n:].any()
        assert torch.equal(batch.tracks()[i], batch.audio[i, :, :n])
    assert rel_err(batch.latents[0, :50], batch.latents[2, :50]) > 1e-2  # seeds matter


def test_one_batched_forward_per_step_and_kv_once(bundle, sampler, monkeypatch):
    calls = Calls(bundle, monkeypatch)
    try:
        sampler([GenerationRequest("a", duration=2, seed=1, guidance="cfg", cfg_scale=2.0, **META),
                 GenerationRequest("b", duration=2, seed=2, guidance="cfg", cfg_scale=2.0, **META)], progress=False)
        assert calls.forwards == [4] * 8 and calls.kv == 1  # [cond a, cond b, null a, null b] per step

        # Guidance only for t >= 0.6: the null rows are skipped on later steps, the cached K/V are sliced.
        calls.forwards.clear()
        calls.kv = 0
        sampler(GenerationRequest("a", duration=2, seed=1, guidance="apg", cfg_scale=4.0, guidance_interval=(0.6, 1.0),
                                  **META), progress=False)
        assert calls.forwards == [2] * 6 + [1] * 2 and calls.kv == 1

        # Cover with audio_cover_strength 0.5: new condition after int(8 * 0.5) = 4 steps -> K/V computed twice.
        calls.forwards.clear()
        calls.kv = 0
        src = 0.1 * torch.randn(2, 48000, generator=torch.Generator().manual_seed(0))
        sampler(GenerationRequest("c", task_type="cover", src_audio=src, audio_cover_strength=0.5, seed=3, **META),
                progress=False)
        assert calls.forwards == [1] * 8 and calls.kv == 2
    finally:
        calls.hook.remove()


def test_mixed_tasks_in_one_batch(sampler):
    """A cover item switching to text2music mid-way and a text2music item share one loop and equal their solo runs."""
    src = 0.1 * torch.randn(2, 2 * 48000, generator=torch.Generator().manual_seed(4))
    reqs = [GenerationRequest("cover me", task_type="cover", src_audio=src, audio_cover_strength=0.5, seed=5,
                              vae_sample=False, **META),
            GenerationRequest("plain", lyrics="la la", duration=2, seed=6, **META)]
    batch = sampler(reqs, progress=False)
    for i, r in enumerate(reqs):
        alone = sampler(r, progress=False)
        assert rel_err(batch.latents[i, : batch.frames[i]], alone.latents[0]) < NOISE


def test_requests_with_different_schedules_run_as_separate_loops(bundle, sampler, monkeypatch):
    calls = Calls(bundle, monkeypatch)
    try:
        out = sampler([GenerationRequest("a", duration=2, seed=1, **META),
                       GenerationRequest("b", duration=2, seed=2, shift=1.0, **META),
                       GenerationRequest("c", duration=2, seed=3, **META)], progress=False)
    finally:
        calls.hook.remove()
    assert calls.forwards == [2] * 8 + [1] * 8  # items 0 and 2 together, item 1 alone
    assert [p["shift"] for p in out.params] == [3.0, 1.0, 3.0]


def test_sampler_restores_train_mode(bundle, sampler):
    bundle.model.train()
    try:
        sampler(GenerationRequest("a", duration=2, seed=1, **META), progress=False)
        assert bundle.model.training
    finally:
        bundle.model.eval()
