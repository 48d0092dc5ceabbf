"""The task classes: the text2music context training uses is the one the sampler feeds the DiT; silence tiling;
the official / DiffSynth rules as strategy objects."""

from __future__ import annotations

import pytest
import torch

from acestep_train import load_model
from acestep_train.conditioning.tasks import (DIFFSYNTH, OFFICIAL, TASKS, Cover, Text2Music, context_latents,
                                              semantics_named, silence_frames)
from acestep_train.inference import GenerationRequest, Sampler

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")


def test_silence_frames_tiles_past_the_end():
    s = torch.arange(3 * 2, dtype=torch.float32).reshape(1, 3, 2)
    assert torch.equal(silence_frames(s, 2), s[0, :2])
    out = silence_frames(s, 7)
    assert out.shape == (7, 2)
    assert torch.equal(out, torch.cat([s[0], s[0], s[0, :1]]))  # 3 + 3 + 1 rows


def test_text2music_context_is_silence_and_an_all_ones_mask():
    s = torch.randn(1, 5, 4)
    ctx = Text2Music().context(s, batch=3, frames=12)
    assert ctx.shape == (3, 12, 8) and ctx.dtype == s.dtype
    expected = torch.cat([s[0].repeat(3, 1)[:12], torch.ones(12, 4)], dim=-1)
    for row in ctx:
        assert torch.equal(row, expected)


def test_the_sampler_feeds_the_dit_the_training_context():
    """Training asks Text2Music().context; the sampler's text2music item must give the DiT exactly that."""
    bundle = load_model("tiny")
    seen = []
    hook = bundle.model.decoder.register_forward_hook(lambda m, args, out: seen.append(args[4].clone()))
    try:
        out = Sampler(bundle)(GenerationRequest("x", duration=1.0, seed=1, semantics="diffsynth"), progress=False)
    finally:
        hook.remove()
    assert len(seen) == out.params[0]["num_inference_steps"]
    expected = Text2Music().context(bundle.silence_latent, 1, out.frames[0])
    for ctx in seen:
        assert torch.equal(ctx, expected)


def test_context_latents_concatenates_source_and_mask():
    src, chunk = torch.randn(2, 6, 3), torch.tensor([[1.0] * 6, [0.0] * 3 + [1.0] * 3])
    ctx = context_latents(src, chunk)
    assert torch.equal(ctx[..., :3], src) and torch.equal(ctx[..., 3:], chunk[..., None].expand(-1, -1, 3))


def test_semantics_rules():
    assert (OFFICIAL.text2music_frames(2.0, 48000, 1920), DIFFSYNTH.text2music_frames(2.0, 48000, 1920)) == (128, 50)
    assert (OFFICIAL.cover_frames(53), DIFFSYNTH.cover_frames(53)) == (53, 55)
    assert OFFICIAL.metas_duration(60.0, 4.0, length_from_audio=True) == 4.0
    assert DIFFSYNTH.metas_duration(60.0, 4.0, length_from_audio=True) == 60.0
    noise, source = torch.randn(4, 2), torch.randn(4, 2)
    assert torch.equal(OFFICIAL.start_latents(noise, source, 0.5, 1.0), noise)  # full strength: pure noise
    assert torch.equal(OFFICIAL.start_latents(noise, source, 0.5, 0.5), 0.5 * noise + 0.5 * source)
    assert torch.equal(DIFFSYNTH.start_latents(noise, None, 0.5, 0.5), noise)
    assert semantics_named("diffsynth") is DIFFSYNTH
    with pytest.raises(ValueError, match="unknown semantics"):
        semantics_named("comfy")


def test_task_table_and_instructions():
    assert list(TASKS) == ["text2music", "cover", "repaint"]
    assert Text2Music().instruction == "Fill the audio semantic mask based on the given conditions:"
    with pytest.raises(ValueError, match="exactly one"):
        Cover(OFFICIAL)
    with pytest.raises(ValueError, match="exactly one"):
        Cover(OFFICIAL, source=torch.zeros(2, 1920), codes=(1,))
