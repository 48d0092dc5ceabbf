"""Request checking (one clear error per bad input, raised before any model runs), audio inputs, resolved params,
the shared conditioning path and output post-processing."""

from __future__ import annotations

import dataclasses
import json
import random

import numpy as np
import pytest
import soundfile as sf
import torch

from acestep_train import load_model
from acestep_train.conditioning.text import encode_text_conditions
from acestep_train.inference import GenerationRequest, RequestError, Sampler, build_conditions
from acestep_train.inference.source_audio import normalize_output, reference_clip, to_stereo_48k

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")
SRC = 0.1 * torch.randn(2, 48000, generator=torch.Generator().manual_seed(0))
CODES = "<|audio_code_1|><|audio_code_2|>"


@pytest.fixture
def guarded(bundle, monkeypatch):
    """A sampler whose models explode when touched: errors must come before any heavy work."""

    def boom(*a, **k):
        raise AssertionError("a model ran before the requests were checked")

    for module in (bundle.model.decoder, bundle.model.encoder, bundle.model.tokenizer, bundle.vae.model,
                   bundle.text_encoder.model):
        monkeypatch.setattr(module, "forward", boom)
    return Sampler(bundle)


def _bad_file(tmp_path):
    p = tmp_path / "broken.wav"
    p.write_bytes(b"RIFF\x00\x00\x00\x00WAVEnot really audio")
    return p


BAD = [
    (dict(task_type="remix"), "unknown task_type 'remix'"),
    (dict(task_type="cover"), "needs src_audio or audio_code_string"),
    (dict(task_type="repaint", src_audio=SRC), "needs repainting_ranges"),
    (dict(task_type="repaint", repainting_ranges=[(0, 1)]), "'repaint' needs src_audio"),
    (dict(task_type="repaint", src_audio=SRC, repainting_ranges=[]), "non-empty list"),
    (dict(task_type="repaint", src_audio=SRC, repainting_ranges=[(0.5, 0.5)]), "empty or inverted"),
    (dict(task_type="repaint", src_audio=SRC, repainting_ranges=[(0.2, 0.9), (3.0, 1.0)]), r"\[1\].*empty or inverted"),
    (dict(duration=0), "duration must be > 0"),
    (dict(duration=-5.0), "duration must be > 0"),
    (dict(duration=601), "longer than the 600 s maximum"),
    (dict(duration="long"), "duration must be a finite number"),
    (dict(task_type="repaint", src_audio=SRC, repainting_ranges=[(0.5, 700)]), "longer than the 600 s maximum"),
    (dict(task_type="cover", audio_code_string="<|audio_code_12|><|audio_code_x|>"), "not parsable"),
    (dict(task_type="cover", audio_code_string="   "), "no <|audio_code_N|> token"),
    (dict(task_type="cover", src_audio="/no/such/file.flac"), "src_audio: cannot use this audio file.*no/such"),
    (dict(task_type="cover", src_audio="BROKEN"), "src_audio: cannot use this audio file.*broken.wav"),
    (dict(reference_audios=["BROKEN"]), r"reference_audios\[0\]: cannot use this audio file"),
    (dict(task_type="cover", src_audio=torch.zeros(2, 100)), "at least 1920"),
    (dict(task_type="cover", src_audio=torch.full((2, 4000), float("nan"))), "NaN"),
    (dict(denoising_strength=0.5), "denoising_strength < 1 starts from audio"),
    (dict(denoising_strength=1.5), "denoising_strength must be <= 1.0"),
    (dict(audio_cover_strength=-0.1), "audio_cover_strength must be >= 0.0"),
    (dict(guidance="pag"), "unknown guidance 'pag'"),
    (dict(guidance="apg"), "needs cfg_scale"),
    (dict(semantics="comfy"), "unknown semantics 'comfy'"),
    (dict(num_inference_steps=4), "exactly 8 steps"),
    (dict(num_inference_steps=0), "num_inference_steps must be an integer >= 1"),
    (dict(shift=0), "shift must be > 0"),
    (dict(timesteps=[0.5, 0.9]), "strictly decreasing"),
    (dict(seed=1.5), "seed must be an integer"),
    (dict(bpm=[120]), "bpm must be a str or number"),
    (dict(vocal_language=""), "language must be a non-empty str"),
    (dict(src_audio=SRC), "src_audio is used by task_type 'cover' and 'repaint'"),
    (dict(audio_code_string=CODES), "audio_code_string is used by task_type='cover'"),
]


@pytest.mark.parametrize("kwargs,message", BAD, ids=[m[:40] for _, m in BAD])
def test_bad_request_fails_first_with_a_clear_message(guarded, tmp_path, kwargs, message):
    broken = str(_bad_file(tmp_path))
    swap = {"BROKEN": broken}
    kwargs = {k: ([swap.get(x, x) for x in v] if isinstance(v, list) and k == "reference_audios"
                  else swap.get(v, v) if isinstance(v, str) else v) for k, v in kwargs.items()}
    good = GenerationRequest("fine", duration=5, seed=1)
    with pytest.raises(RequestError, match=message) as info:
        guarded([good, GenerationRequest("x", **kwargs)], progress=False)
    assert str(info.value).startswith("request 1: ")  # names the offending request in the batch


def test_audio_path_is_decoded_resampled_and_made_stereo(bundle, tmp_path):
    path = tmp_path / "mono_44k.flac"
    rng = np.random.default_rng(0)
    sf.write(str(path), (0.2 * rng.standard_normal(44100)).astype(np.float32), 44100)
    audio = to_stereo_48k(str(path), "src_audio")
    assert audio.shape == (2, 48000) and torch.equal(audio[0], audio[1])
    out = Sampler(bundle)(GenerationRequest("x", task_type="cover", src_audio=path, seed=3, **_meta()),
                          progress=False)
    assert out.frames == [25] and out.lengths == [48000] and out.params[0]["src_audio"] == str(path)
    # A (tensor, sample_rate) pair and a [1, C, N] tensor are accepted too.
    assert to_stereo_48k((torch.zeros(1, 22050), 22050), "x").shape == (2, 48000)
    assert to_stereo_48k(torch.zeros(1, 2, 4000), "x").shape == (2, 4000)


def _meta():
    return dict(bpm=100, keyscale="B minor", timesignature="4")


def test_params_hold_every_request_field_and_the_resolved_values(bundle):
    out = Sampler(bundle)(GenerationRequest("x", duration=6, seed=None), progress=False)
    p = out.params[0]
    assert {f.name for f in dataclasses.fields(GenerationRequest)} <= set(p)
    assert isinstance(p["seed"], int) and p["seed"] >= 0  # a random seed is reported
    assert p["num_inference_steps"] == 8 and p["schedule"] == "turbo" and p["shift"] == 3.0
    assert p["timesteps"] == pytest.approx([1.0, 0.954545, 0.9, 0.833333, 0.75, 0.642857, 0.5, 0.3], abs=1e-6)
    assert (p["guidance"], p["cfg_scale"], p["frames"], p["output_seconds"]) == ("none", 1.0, 150, 6.0)
    again = Sampler(bundle)(GenerationRequest("x", duration=6, seed=p["seed"]), progress=False)
    assert torch.equal(again.latents, out.latents)  # the reported seed reproduces the item
    rich = Sampler(bundle).plan(GenerationRequest("x", task_type="repaint", src_audio=SRC, reference_audios=[SRC],
                                                  repainting_ranges=[(0.2, None)], timesteps=[1.0, 0.5], seed=1))[0]
    json.dumps(rich.params)  # sidecar-ready: audio inputs are described, not embedded
    assert rich.params["src_audio"] == "Tensor[2, 48000]" and rich.params["repaint_frames"] == [[5, 25]]


def test_bfloat16_model_samples():
    bf16 = load_model("tiny", dtype="bfloat16")
    out = Sampler(bf16)([GenerationRequest("x", duration=5.5, seed=1, guidance="apg", cfg_scale=3.0),
                         GenerationRequest("y", duration=6, seed=2, guidance="apg", cfg_scale=3.0)], progress=False)
    assert out.audio.dtype == torch.float32 and torch.isfinite(out.audio).all() and out.frames == [137, 150]


def test_build_conditions_is_text_conditions_plus_encoder_with_silence_timbre(bundle):
    reqs = [GenerationRequest("warm pads", lyrics="la", duration=12, bpm=80),
            GenerationRequest("fast drums", lyrics="[chorus]\nhey hey hey", duration=30, keyscale="E major")]
    enc, mask = build_conditions(bundle, reqs)
    with torch.no_grad():
        tc = encode_text_conditions(bundle.text_encoder, ["warm pads", "fast drums"], ["la", "[chorus]\nhey hey hey"],
                                    bpm=[80, None], keyscale=[None, "E major"], timesignature=[None, None],
                                    duration=[12, 30], vocal_language=["unknown", "unknown"])
        sil = bundle.silence_latent[:, :750].expand(2, -1, -1)
        ref_enc, ref_mask = bundle.model.encoder(tc.text_hidden, tc.text_mask, tc.lyric_embeds, tc.lyric_mask, sil,
                                                 torch.arange(2))
    assert torch.equal(mask, ref_mask) and not bool(mask.all())  # padded: two different lengths
    assert torch.allclose(enc[mask], ref_enc[mask], atol=1e-6)
    # Precomputed reference latents replace the silence default of their row only.
    ref = torch.randn(1, 750, bundle.config.audio_acoustic_hidden_dim)
    enc2, _ = build_conditions(bundle, reqs, refer_latents=[ref, None])
    assert not torch.allclose(enc2[0], enc[0]) and torch.allclose(enc2[1], enc[1], atol=1e-6)


def test_reference_clip_takes_one_10s_segment_per_third():
    sr = 48000
    ramp = torch.arange(45 * sr, dtype=torch.float64)[None].expand(2, -1)
    clip = reference_clip(ramp, random.Random(0))
    assert clip.shape == (2, 30 * sr)
    starts = [int(clip[0, i * 10 * sr]) for i in range(3)]
    third = 15 * sr
    for k, s in enumerate(starts):
        assert k * third <= s <= (k + 1) * third - 10 * sr
        assert torch.equal(clip[0, k * 10 * sr:(k + 1) * 10 * sr], ramp[0, s:s + 10 * sr])
    short = reference_clip(torch.ones(2, 4 * sr), random.Random(0))  # repeated up to 30 s first
    assert short.shape == (2, 30 * sr)


def test_silent_reference_is_dropped(bundle):
    s = Sampler(bundle)
    with_silent = s.plan(GenerationRequest("x", reference_audios=[torch.zeros(2, 48000)]))[0]
    assert with_silent.references == []


def test_output_is_anticlipped_then_normalised_to_minus_1_dbfs():
    loud = torch.tensor([[3.0, -1.5], [0.5, 0.0]])
    out = normalize_output(loud)
    assert out.abs().max().item() == pytest.approx(10 ** (-1 / 20), rel=1e-6)
    assert torch.allclose(out, loud / 3.0 * 10 ** (-1 / 20))
    quiet = torch.full((2, 4), 1e-8)
    assert torch.equal(normalize_output(quiet), quiet)  # near-silence is left alone
