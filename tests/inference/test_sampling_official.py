"""Official-semantics behaviour checked against the documented formulas (``docs/pipeline.md`` §5–6), and APG against
diffusers' implementation.

The DiffSynth package cannot be the reference where the official pipeline differs from it (turbo tables and shift
rounding, APG, repaint injection + crossfade, cover-noise truncation), so these tests re-derive each behaviour from
its formula with a deliberately plain loop over the same DiT and compare.
"""

from __future__ import annotations

import math

import pytest
import torch

from acestep_train.inference import GenerationRequest, build_conditions
from acestep_train.inference import guidance as G
from acestep_train.inference import schedules as S
from numerics import rel_err

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")
META = dict(bpm=90, keyscale="A minor", timesignature="3")


def shifted(t: torch.Tensor, s: float) -> torch.Tensor:
    return s * t / (1 + (s - 1) * t)


# ---- schedules ------------------------------------------------------------------------------------------------------

def test_turbo_tables_are_the_shifted_8_step_linspace():
    base = torch.linspace(1, 0, 9, dtype=torch.float64)[:-1]
    for s, table in S.SHIFT_TIMESTEPS.items():
        assert torch.allclose(torch.tensor(table, dtype=torch.float64), shifted(base, s), atol=1e-15)
        assert S.turbo_schedule(s).timesteps == pytest.approx(table, abs=1e-7)
    union = sorted({v for t in S.SHIFT_TIMESTEPS.values() for v in t}, reverse=True)
    assert list(S.VALID_TIMESTEPS) == union and len(union) == 20


@pytest.mark.parametrize("shift,rounded", [(0.3, 1.0), (1.4, 1.0), (1.6, 2.0), (2.5, 2.0), (2.51, 3.0), (5.0, 3.0)])
def test_turbo_shift_is_rounded(shift, rounded):
    sched = S.resolve_schedule(semantics="official", kind="turbo", steps=8, shift=shift, timesteps=None,
                               denoising_strength=1.0)
    assert sched.shift == rounded and sched.timesteps == pytest.approx(S.SHIFT_TIMESTEPS[rounded], abs=1e-7)


def test_turbo_custom_timesteps_snap_and_steps_are_fixed():
    sched = S.resolve_schedule(semantics="official", kind="turbo", steps=8, shift=3.0,
                               timesteps=[0.99, 0.8, 0.41, 0.13, 0.0, 0.0], denoising_strength=1.0)
    assert sched.timesteps == pytest.approx([1.0, 0.7692307692307693, 0.4, 0.125], abs=1e-7)
    with pytest.raises(ValueError, match="exactly 8 steps"):
        S.resolve_schedule(semantics="official", kind="turbo", steps=4, shift=3.0, timesteps=None,
                           denoising_strength=1.0)


def test_linear_continuous_and_diffsynth_schedules():
    lin = S.resolve_schedule(semantics="official", kind="linear", steps=50, shift=1.0, timesteps=None,
                             denoising_strength=1.0)
    assert lin.timesteps == pytest.approx(torch.linspace(1, 0, 51)[:-1].tolist(), abs=1e-7)
    cont = S.resolve_schedule(semantics="official", kind="continuous", steps=10, shift=4.5, timesteps=None,
                              denoising_strength=1.0)
    assert cont.shift == 4.5  # no rounding
    assert cont.timesteps == pytest.approx(shifted(torch.linspace(1, 0, 11)[:-1], 4.5).tolist(), abs=1e-6)
    # DiffSynth audio-to-audio keeps N steps and starts at the *shifted* strength (shift 3, 0.9 -> 0.964).
    ds = S.resolve_schedule(semantics="diffsynth", kind="turbo", steps=8, shift=3.0, timesteps=None,
                            denoising_strength=0.9)
    assert ds.steps == 8 and ds.timesteps[0] == pytest.approx(0.9642857, abs=1e-6)
    # Official cover_noise_strength: truncate at the table entry nearest to the strength (0.6 -> 0.642857, 3 steps).
    off = S.resolve_schedule(semantics="official", kind="turbo", steps=8, shift=3.0, timesteps=None,
                             denoising_strength=0.6)
    assert off.timesteps == pytest.approx([0.6428571428571429, 0.5, 0.3], abs=1e-7) and off.truncated_from == 8


# ---- APG ------------------------------------------------------------------------------------------------------------

def test_apg_equals_diffusers_normalized_guidance():
    """Ours vs ``diffusers.guiders.adaptive_projected_guidance.normalized_guidance`` over several steps.

    Convention mapping (diffusers' own ACE-Step pipeline calls it exactly like this):
    * official ``v = v_cond + (s - 1)·update``  <->  diffusers ``use_original_formulation=True`` (adds to
      ``pred_cond``) with ``guidance_scale = s - 1``; the default formulation would add to ``pred_uncond``.
    * momentum -0.75: both keep ``running = diff + momentum·running`` from 0, one buffer for the whole generation.
    * norm threshold 2.5 = diffusers ``norm_threshold`` (its guider class calls it ``..._rescale``).
    * ``dims=[1]`` on ``[B, T, C]`` = the time axis = diffusers ``norm_dim=(1,)``; its default (all non-batch dims)
      would be a different guidance.
    * eta 0 (official) vs diffusers' default 1.0.
    """
    from diffusers.guiders.adaptive_projected_guidance import MomentumBuffer, normalized_guidance

    g = torch.Generator().manual_seed(0)
    ours_buf, ref_buf = G.MomentumBuffer(-0.75), MomentumBuffer(-0.75)
    for step in range(5):
        v_c = torch.randn(2, 40, 8, generator=g) * (1 + step)
        v_u = v_c + torch.randn(2, 40, 8, generator=g) * 0.8
        ours = G.apg(v_c, v_u, 7.0, ours_buf)
        ref = normalized_guidance(v_c, v_u, guidance_scale=6.0, momentum_buffer=ref_buf, eta=0.0, norm_threshold=2.5,
                                  use_original_formulation=True, norm_dim=(1,))
        assert rel_err(ours, ref) < 1e-6, step
        wrong = normalized_guidance(v_c, v_u, guidance_scale=6.0, momentum_buffer=None, eta=0.0, norm_threshold=2.5,
                                    use_original_formulation=True, norm_dim=None)
        assert rel_err(ours, wrong) > 1e-3  # the dims / momentum mapping matters
    # The threshold was active (diff norms over time are far above 2.5 here).
    assert torch.linalg.vector_norm(ours_buf.running, dim=1).max() > 2.5


def test_apg_sampler_matches_a_plain_loop_with_diffusers_apg(bundle, sampler):
    """Sampler with APG and a guidance interval vs two separate DiT passes + diffusers APG per step."""
    from diffusers.guiders.adaptive_projected_guidance import MomentumBuffer, normalized_guidance

    req = GenerationRequest("dark ambient drone", lyrics="ooh", duration=6, seed=11, guidance="apg", cfg_scale=5.0,
                            schedule="continuous", num_inference_steps=6, shift=2.0, guidance_interval=(0.4, 1.0),
                            **META)
    out = sampler(req, progress=False)
    with torch.no_grad():
        enc, _ = build_conditions(bundle, [req])
        null = bundle.model.null_condition_emb.expand_as(enc)
        t_frames, dim = 150, bundle.config.audio_acoustic_hidden_dim
        sil = bundle.silence_latent[:, :t_frames]
        ctx = torch.cat([sil, torch.ones_like(sil)], -1)
        x = torch.randn(1, t_frames, dim, generator=torch.Generator().manual_seed(11))
        ts = shifted(torch.linspace(1, 0, 7), 2.0).tolist()[:-1] + [0.0]
        buf, guided = MomentumBuffer(-0.75), 0
        for t, t_next in zip(ts[:-1], ts[1:]):
            tt = torch.tensor([t])
            v = bundle.model.decoder(x, tt, tt, enc, ctx)
            if 0.4 <= t <= 1.0:
                v_u = bundle.model.decoder(x, tt, tt, null, ctx)
                v = normalized_guidance(v, v_u, guidance_scale=4.0, momentum_buffer=buf, eta=0.0, norm_threshold=2.5,
                                        use_original_formulation=True, norm_dim=(1,))
                guided += 1
            x = x - v * (t - t_next)
    assert 0 < guided < 6  # the interval cut some steps
    e = rel_err(out.latents[0], x[0])
    print(f"\n[APG sampler vs plain loop + diffusers APG] latents rel err {e:.2e}")
    assert e < 1e-5


def test_adg_runs_and_stays_finite(sampler):
    out = sampler(GenerationRequest("x", duration=6, seed=1, guidance="adg", cfg_scale=3.0, **META), progress=False)
    assert torch.isfinite(out.latents).all() and out.params[0]["guidance"] == "adg"


# ---- repaint (official) -------------------------------------------------------------------------------------------

def test_official_repaint_matches_the_documented_algorithm(bundle, sampler):
    """docs/pipeline.md §6.7: zero padding to the range, chunk mask 1 only in the region and silence there, source
    (noised with the initial noise to t_next) injected outside for the first round(0.5·N) steps, then the 10-frame
    linear crossfade back to the clean source."""
    dur, rng = 2.0, (1.2, 2.6)  # ends 0.6 s after the source: right padding
    g = torch.Generator().manual_seed(2)
    src = 0.3 * torch.sin(torch.arange(int(dur * 48000)) / 48000 * 2 * math.pi * 440).expand(2, -1).clone()
    src += 0.02 * torch.randn(src.shape, generator=g)
    req = GenerationRequest("piano", task_type="repaint", src_audio=src, repainting_ranges=[rng], seed=4,
                            vae_sample=False, **META)
    out = sampler(req, progress=False)

    with torch.no_grad():
        padded = torch.nn.functional.pad(src, (0, int(rng[1] * 48000) - src.shape[1]))
        clean = bundle.vae.encode(padded[None], sample=False)[0]
        t_frames, dim = clean.shape
        a, b = int(rng[0] * 48000 // 1920), min(int(rng[1] * 48000 // 1920), t_frames)
        region = torch.zeros(t_frames, dtype=torch.bool)
        region[a:b] = True
        sil = bundle.silence_latent[0, :t_frames]
        ctx = torch.cat([torch.where(region[:, None], sil, clean), region.float()[:, None].expand(-1, dim)], -1)[None]
        enc, _ = build_conditions(bundle, [req])
        noise = torch.randn(1, t_frames, dim, generator=torch.Generator().manual_seed(4))[0]
        x = noise.clone()
        ts = list(S.SHIFT_TIMESTEPS[3.0]) + [0.0]
        for i, (t, t_next) in enumerate(zip(ts[:-1], ts[1:])):
            tt = torch.tensor([t])
            v = bundle.model.decoder(x[None], tt, tt, enc, ctx)[0]
            x = x - v * (t - t_next)
            if i < round(0.5 * 8):
                x = torch.where(region[:, None], x, t_next * noise + (1 - t_next) * clean)
        soft = region.float()
        soft[a - 10:a] = torch.linspace(0, 1, 12)[1:-1]
        x = soft[:, None] * x + (1 - soft[:, None]) * clean
    assert out.frames == [t_frames] and out.params[0]["repaint_frames"] == [[a, b]]
    e = rel_err(out.latents[0], x)
    print(f"\n[official repaint vs documented algorithm] latents rel err {e:.2e}")
    assert e < 1e-5
    # Far from the region the output is the clean source exactly; inside it is generated.
    assert torch.equal(out.latents[0, : a - 10], clean[: a - 10])
    assert (out.latents[0, a:b] - clean[a:b]).abs().max() > 1e-2


# ---- cover noise (official) -----------------------------------------------------------------------------------------

def test_official_cover_noise_truncates_the_schedule_and_starts_from_the_source(bundle, sampler):
    src = 0.2 * torch.randn(2, 48000 * 2, generator=torch.Generator().manual_seed(8))
    req = GenerationRequest("x", task_type="cover", src_audio=src, denoising_strength=0.6,
                            audio_cover_strength=0.7, seed=5, vae_sample=False, **META)
    seen = []
    hook = bundle.model.decoder.register_forward_hook(lambda m, args, kw_out: seen.append((args[0].clone(),
                                                                                          args[1].clone())))
    try:
        out = sampler(req, progress=False)
    finally:
        hook.remove()
    p = out.params[0]
    assert p["num_inference_steps"] == 3 and p["schedule_truncated_from"] == 8
    assert p["cover_switch_step"] == int(3 * 0.7) and len(seen) == 3
    t0 = 0.6428571428571429
    lat = bundle.vae.encode(src[None], sample=False)[0]
    noise = torch.randn(1, 50, bundle.config.audio_acoustic_hidden_dim, generator=torch.Generator().manual_seed(5))[0]
    assert seen[0][1].tolist() == pytest.approx([t0], abs=1e-7)
    assert rel_err(seen[0][0][0], t0 * noise + (1 - t0) * lat) < 1e-6


# ---- lengths and metas ---------------------------------------------------------------------------------------------

def test_text2music_length_rules(sampler):
    off = sampler.plan(GenerationRequest("x", duration=2.0))[0]
    ds = sampler.plan(GenerationRequest("x", duration=2.0, semantics="diffsynth"))[0]
    assert off.frames == 128 and ds.frames == 50  # official minimum of 128 frames (5.12 s)
    assert sampler.plan(GenerationRequest("x", duration=30.04))[0].frames == 750  # int(round(30.04, 1)·48000)//1920
    assert sampler.plan(GenerationRequest("x", duration=30.04, semantics="diffsynth"))[0].frames == 751
    assert sampler.plan(GenerationRequest("x"))[0].frames == 1500  # default 60 s


def test_guidance_defaults_follow_the_variant(sampler):
    with pytest.warns(UserWarning, match="ignored"):
        p = sampler.plan(GenerationRequest("x", cfg_scale=4.0))[0]  # turbo: official ignores guidance
    assert p.guidance.kind == "none"
    p = sampler.plan(GenerationRequest("x", cfg_scale=4.0, semantics="diffsynth"))[0]
    assert (p.guidance.kind, p.guidance.scale) == ("cfg", 4.0)
    bundle = sampler.bundle
    base = type(bundle.sampling)(steps=50, schedule="linear", shift=1.0, guidance="apg", guidance_scale=7.0)
    saved, bundle.sampling = bundle.sampling, base
    try:
        p = sampler.plan(GenerationRequest("x"))[0]
    finally:
        bundle.sampling = saved
    assert (p.guidance.kind, p.guidance.scale, p.schedule.steps, p.schedule.kind) == ("apg", 7.0, 50, "linear")
