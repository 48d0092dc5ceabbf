"""End-to-end parity of our sampler with the ``diffsynth`` package's ``AceStepPipeline`` (2.1.12) on identical weights.

The DiffSynth pipeline is built programmatically from the tiny bundle (``ds_pipeline``): its DiT, conditioner and
audio tokenizer from our ``AceStepModel`` state dict (``tests/peers.py`` loaders, strict keys), its VAE
(``AceStepVAE``, weight norm folded as ``from_pretrained`` does) from our diffusers VAE weights, its text encoder
(``AceStepTextEncoder``, a ``Qwen3Model`` wrapper) holding our tiny Qwen3 weights, our tiny tokenizer, our
silence latent. Everything runs in fp32 on CPU with the same seed, so both draw the same initial noise
(``torch.Generator("cpu").manual_seed(seed)``, shape ``[1, T, dim]``, DiffSynth ``generate_noise``).

Compared: latents just before VAE decode (captured from DiffSynth's ``vae.decode``) and the final audio, as
max |ours - ref| / max |ref| <= 1e-4. Plain CFG (``cfg_scale`` 2.0, and 1.0 = no guidance) everywhere: DiffSynth
has no APG. ``semantics="diffsynth"`` must match for every task; ``semantics="official"`` must match where the
two pipelines agree (text2music with T >= 128 and equal length rules; cover from unsampled VAE latents with a
source length that is a multiple of 5 frames, so the official crop of the hints is a no-op).

Known DiffSynth behaviours the tests pin (installed 2.1.12, read from its source):
* ``OobleckDiagonalGaussianDistribution.sample()`` returns the posterior mean (the random draw is commented out),
  so its VAE encode is deterministic; ``semantics="diffsynth"`` encodes with the mean too.
* Missing metas print ``None``; we always print ``N/A``, so every case passes explicit bpm/keyscale/timesignature.
"""

from __future__ import annotations

import math

import pytest
import torch

from diffsynth_pipeline import compare, tiny_with_peer


pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")


@pytest.fixture(scope="module")
def setup():
    return tiny_with_peer()


def source_audio(seconds: float, seed: int = 3) -> torch.Tensor:
    n = int(seconds * 48000)
    g = torch.Generator().manual_seed(seed)
    t = torch.arange(n) / 48000
    left = 0.3 * torch.sin(2 * math.pi * 220 * t) + 0.05 * torch.randn(n, generator=g)
    right = 0.3 * torch.sin(2 * math.pi * 330 * t) * torch.sin(2 * math.pi * 0.5 * t)
    return torch.stack([left, right])


@pytest.mark.parametrize("cfg", [1.0, 2.0])
@pytest.mark.parametrize("semantics", ["diffsynth", "official"])
def test_text2music(setup, semantics, cfg):
    # Official: 6 s = 150 frames, where both length rules agree (max(128, 288000 // 1920) and round(25 * 6)).
    seconds = 6 if semantics == "official" else 3
    out = compare(setup, dict(cfg_scale=cfg, duration=seconds), dict(duration=seconds, semantics=semantics),
                  f"text2music {semantics} cfg={cfg}")
    assert out.frames == [25 * seconds] and out.params[0]["num_inference_steps"] == 8


@pytest.mark.parametrize("cfg", [1.0, 2.0])
def test_cover_diffsynth(setup, cfg):
    # 2.1 s -> 52 frames: DiffSynth keeps all 55 hint frames (not cropped), with audio_cover_strength < 1 (switch
    # to the text2music condition after int(8 * 0.5) = 4 steps) and denoising_strength < 1 (start from the noised
    # source at the *shifted* strength).
    src = source_audio(2.1)
    common = dict(task_type="cover", src_audio=src, duration=2, audio_cover_strength=0.5)
    out = compare(setup, dict(cfg_scale=cfg, **common), dict(semantics="diffsynth", **common),
                  f"cover diffsynth strength 0.5 cfg={cfg}")
    assert out.frames == [55] and out.params[0]["cover_switch_step"] == 4
    if cfg != 1.0:
        common = dict(task_type="cover", src_audio=src, duration=2, denoising_strength=0.6)
        out = compare(setup, dict(cfg_scale=cfg, **common), dict(semantics="diffsynth", **common),
                      f"cover diffsynth denoising 0.6 cfg={cfg}")
        assert out.params[0]["timesteps"][0] == pytest.approx(3 * 0.6 / (1 + 2 * 0.6), rel=1e-6)


def test_cover_official_where_pipelines_agree(setup):
    # 2 s -> 50 frames (multiple of 5: the official crop of the hints is a no-op); metas duration = source length;
    # posterior mean like DiffSynth 2.1.12.
    common = dict(task_type="cover", src_audio=source_audio(2.0), audio_cover_strength=0.5)
    out = compare(setup, dict(cfg_scale=2.0, duration=2, **common), dict(semantics="official", vae_sample=False,
                                                                         **common), "cover official cfg=2")
    assert out.frames == [50] and out.params[0]["metas_duration"] == 2.0


@pytest.mark.parametrize("cfg", [2.0])
def test_cover_from_audio_codes(setup, cfg):
    codes = "".join(f"<|audio_code_{i}|>" for i in [5, 63999, 12345, 777, 4242, 100, 9])
    common = dict(task_type="cover", audio_code_string=codes, duration=2)
    out = compare(setup, dict(cfg_scale=cfg, **common), dict(semantics="diffsynth", **common), f"codes cfg={cfg}")
    assert out.frames == [35]


@pytest.mark.parametrize("cfg", [1.0, 2.0])
def test_repaint_diffsynth(setup, cfg):
    # Two ranges, one reaching before the start and one past the end (both sides padded, padding fully
    # repainted), soft strength 0.8 inside the ranges.
    common = dict(task_type="repaint", src_audio=source_audio(2.0), repainting_ranges=[(-0.5, 0.6), (1.2, 2.5)],
                  repainting_strength=0.8, duration=2)
    out = compare(setup, dict(cfg_scale=cfg, **common), dict(semantics="diffsynth", **common),
                  f"repaint diffsynth cfg={cfg}")
    assert out.frames == [75] and out.params[0]["pad_samples"] == [24000, 24000]
