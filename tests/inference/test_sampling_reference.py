"""Reference-audio (timbre) conditioning against DiffSynth's ``AceStepPipeline`` (see ``test_sampling_parity.py``).

Separate file because each call VAE-encodes a 30 s clip (twice: ours and DiffSynth's), the slowest case.
"""

from __future__ import annotations

import pytest
import torch

from acestep_train.inference import GenerationRequest
from diffsynth_pipeline import compare, tiny_with_peer

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")


@pytest.fixture(scope="module")
def setup():
    return tiny_with_peer()


def test_reference_audio_timbre(setup):
    # Exactly 30 s: DiffSynth's three random 10 s segments are then fixed (randint(0, 0)), so both pick the same clip.
    ref = 0.2 * torch.randn(2, 30 * 48000, generator=torch.Generator().manual_seed(5))
    common = dict(reference_audios=[ref], duration=4)
    out = compare(setup, dict(cfg_scale=2.0, **common), dict(semantics="diffsynth", **common), "reference cfg=2")
    assert out.params[0]["references_used"] == 1
    # The timbre really entered the condition: without the reference the same seed gives other latents.
    plain = setup[1](GenerationRequest(prompt=out.params[0]["prompt"], lyrics=out.params[0]["lyrics"], duration=4,
                                       seed=7, cfg_scale=2.0, semantics="diffsynth", bpm=120, keyscale="C major",
                                       timesignature="4", vocal_language="en"), progress=False)
    assert not torch.equal(plain.latents, out.latents)
