"""What to generate (:class:`GenerationRequest`) and its checked, fully resolved form (:class:`Plan`).

``plan_request`` does every check and every cheap preparation (decoding audio files, parsing codes, resolving
defaults and the schedule) so that a bad request fails with one clear :class:`RequestError` before any model runs.

Parameters follow DiffSynth's ``AceStepPipeline.__call__`` (same names and defaults where they exist) plus the
official-pipeline knobs. ``None`` means "the model's :class:`~acestep_train.checkpoints.loading.SamplingDefaults`" for steps,
shift, schedule and guidance; ``semantics`` picks the official behaviour (default) or DiffSynth's where the two
differ (``pipeline.md`` §9):

* text2music length: official ``max(128, int(round(d, 1)·48000) // 1920)`` frames; diffsynth ``round(25·d)``.
* metas duration: official the request's (text2music) or the output length (audio tasks); diffsynth always the
  ``duration`` argument (default 60 s).
* schedule: official turbo tables (shift rounded to 1/2/3, 8 steps) or linspace + shift per the variant; diffsynth
  ``linspace(denoising_strength, 0, N+1)[:-1]`` shifted by the raw shift.
* guidance default: official the variant's (turbo none, base/sft APG 7.0); diffsynth plain CFG when
  ``cfg_scale != 1``.
* ``denoising_strength < 1``: official truncates the schedule at the entry nearest to it (fewer steps) and starts
  from ``t0·noise + (1-t0)·source``; diffsynth keeps N steps from the *shifted* strength.
* cover hints: official cropped to the source length; diffsynth not cropped (up to 4 more frames).
* repaint: official chunk mask 1 only in the region with silence latents there, the noised source injected
  outside for the first 50 % of steps, a 10-frame crossfade at the end; diffsynth chunk mask all ones, a soft
  silence blend by ``repainting_strength``, a velocity blend towards the source on every step, padding fully
  repainted, no crossfade.
* VAE encode of inputs: official a posterior sample (seeded from ``seed``); diffsynth the posterior mean (what
  diffsynth 2.1.12's ``sample()`` returns).
* VAE decode: official 512-frame tiles with 64 discarded frames per side; diffsynth one pass (its ``tiled=False``).

Noise: per item ``torch.randn([1, T, dim], generator=torch.Generator(rand_device).manual_seed(seed),
device=rand_device, dtype=<DiT dtype>)``, then moved to the model device and kept in float32. This is exactly
DiffSynth's ``generate_noise(shape, seed, rand_device, rand_torch_dtype=pipe.torch_dtype)`` (its default
``rand_device="cpu"``; its batch is always one item, so a batch of ours draws each item as DiffSynth would draw it
alone), and the same seed gives the same noise whatever else is in the batch. The official pipeline draws on the
model device: pass ``rand_device="cuda"`` for that convention.
"""

from __future__ import annotations

import math
import random
import secrets
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from typing import Any

import torch

from acestep_train.conditioning.prompts import caption_prompt, format_metas, lyric_prompt
from acestep_train.inference.source_audio import HOP, SAMPLE_RATE, AudioInput, describe, is_silent, reference_clip, to_stereo_48k
from acestep_train.inference.codes import parse_audio_codes
from acestep_train.inference.guidance import GUIDANCE_KINDS, Guidance
from acestep_train.inference.schedules import Schedule, resolve_schedule

TASK_TYPES = ("text2music", "cover", "repaint")
SEMANTICS = ("official", "diffsynth")
FRAMES_PER_SECOND = SAMPLE_RATE / HOP  # 25
MAX_DURATION_S = 600.0
DEFAULT_DURATION_S = 60.0  # DiffSynth's default; the official pipeline picks a random 10-120 s
OFFICIAL_MIN_FRAMES = 128


class RequestError(ValueError):
    """A generation request that cannot be run; the message names the request and the parameter."""


@dataclass
class GenerationRequest:
    """One track to generate. See the module docstring for the official/DiffSynth differences."""

    prompt: str = ""
    cfg_scale: float | None = None  # guidance scale; None: the model default
    lyrics: str = ""
    task_type: str = "text2music"  # text2music | cover | repaint
    reference_audios: Sequence[AudioInput] | None = None  # timbre; none -> silence_latent[:750]
    src_audio: AudioInput | None = None  # cover / repaint source
    denoising_strength: float = 1.0  # < 1: start from src/input audio (official: 1 - cover_noise_strength)
    audio_cover_strength: float = 1.0  # cover: switch to text2music conditions after this fraction of steps
    audio_code_string: str | None = None  # cover from <|audio_code_N|> codes (replaces src_audio as the hint)
    repainting_ranges: Sequence[tuple[float, float | None]] | None = None  # seconds; end None/-1 = source end
    repainting_strength: float = 1.0  # diffsynth repaint: mask value inside the ranges
    duration: float | None = None  # seconds (text2music length; metas)
    bpm: int | float | str | None = None
    keyscale: str | None = None
    timesignature: int | str | None = None
    vocal_language: str = "unknown"
    seed: int | None = None  # None or -1: a random seed (reported in the result)
    rand_device: str = "cpu"
    num_inference_steps: int | None = None
    shift: float | None = None
    input_audio: AudioInput | None = None  # audio-to-audio start point (with denoising_strength < 1)
    guidance: str | None = None  # none | cfg | apg | adg
    guidance_interval: tuple[float, float] | None = None  # apply guidance for interval[0] <= t <= interval[1]
    schedule: str | None = None  # turbo | continuous | linear (official semantics)
    timesteps: Sequence[float] | None = None  # custom schedule (official turbo: snapped to VALID_TIMESTEPS)
    repaint_injection_ratio: float = 0.5  # official repaint: steps with source injection
    repaint_crossfade_frames: int = 10  # official repaint: final boundary crossfade
    vae_sample: bool | None = None  # encode inputs with a posterior sample (None: by semantics)
    semantics: str = "official"  # official | diffsynth


@dataclass
class Plan:
    """A checked request with every value resolved; audio decoded to ``[2, N]`` 48 kHz float32 (CPU)."""

    index: int
    request: GenerationRequest
    semantics: str
    task: str
    seed: int
    rand_device: str
    frames: int  # latent frames of the output
    metas_duration: float
    schedule: Schedule
    guidance: Guidance
    vae_sample: bool
    src_audio: torch.Tensor | None = None  # repaint: already padded
    input_audio: torch.Tensor | None = None
    references: list[torch.Tensor] = field(default_factory=list)  # 30 s clips (silent ones dropped)
    codes: list[int] | None = None
    repaint_ranges: list[tuple[float, float]] = field(default_factory=list)  # seconds in padded coordinates
    repaint_frames: list[tuple[int, int]] = field(default_factory=list)  # official frame ranges
    pad_samples: tuple[int, int] = (0, 0)
    cover_switch_step: int | None = None
    params: dict[str, Any] = field(default_factory=dict)

    def condition_fields(self, task: str | None = None) -> dict[str, Any]:
        r = self.request
        return dict(caption=r.prompt, lyrics=r.lyrics, bpm=r.bpm, keyscale=r.keyscale, timesignature=r.timesignature,
                    duration=self.metas_duration, vocal_language=r.vocal_language, task=task or self.task)

    @property
    def loop_key(self) -> tuple:
        """Requests with the same key share one denoising loop (same steps, t values and guidance)."""
        return (self.schedule.timesteps, self.guidance)


# ---- helpers ------------------------------------------------------------------------------------------------------

def _number(value: Any, name: str, lo: float | None = None, hi: float | None = None, lo_open: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    if lo is not None and (value < lo or (lo_open and value == lo)):
        raise ValueError(f"{name} must be {'>' if lo_open else '>='} {lo}, got {value!r}")
    if hi is not None and value > hi:
        raise ValueError(f"{name} must be <= {hi}, got {value!r}")
    return float(value)


def _int(value: Any, name: str, lo: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < lo:
        raise ValueError(f"{name} must be an integer >= {lo}, got {value!r}")
    return value


def _check_duration(seconds: float, what: str) -> None:
    if seconds > MAX_DURATION_S:
        raise ValueError(f"{what} is {seconds:.1f} s, longer than the {MAX_DURATION_S:.0f} s maximum")


def _seed(value: Any) -> int:
    if value is None or value == -1:
        return secrets.randbelow(2**31)
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 2**63:
        raise ValueError(f"seed must be an integer in [0, 2**63) (or None/-1 for random), got {value!r}")
    return value


def _generator_device(device: Any) -> str:
    try:
        torch.Generator(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"rand_device {device!r} cannot hold a torch.Generator here ({e})") from None
    return str(device)


def _ranges(value: Any) -> list[tuple[float, float | None]]:
    if value is None:
        raise ValueError("task_type='repaint' needs repainting_ranges, e.g. [(10.0, 20.0)] (seconds)")
    if (isinstance(value, (tuple, list)) and len(value) == 2
            and all(v is None or (isinstance(v, (int, float)) and not isinstance(v, bool)) for v in value)):
        value = [tuple(value)]  # a single (start, end) pair
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence) or len(value) == 0:
        raise ValueError(f"repainting_ranges must be a non-empty list of (start, end) seconds, got {value!r}")
    out = []
    for i, rng in enumerate(value):
        if isinstance(rng, (str, bytes)) or not isinstance(rng, Sequence) or len(rng) != 2:
            raise ValueError(f"repainting_ranges[{i}] must be a (start, end) pair of seconds, got {rng!r}")
        start = _number(rng[0], f"repainting_ranges[{i}] start")
        end = None if rng[1] is None or rng[1] == -1 else _number(rng[1], f"repainting_ranges[{i}] end")
        out.append((start, end))
    return out


# ---- resolution ---------------------------------------------------------------------------------------------------

def _resolve_guidance(req: GenerationRequest, defaults, semantics: str) -> Guidance:
    kind, scale = req.guidance, req.cfg_scale
    if scale is not None:
        scale = _number(scale, "cfg_scale", 0.0)
    if kind is not None and kind not in GUIDANCE_KINDS:
        raise ValueError(f"unknown guidance {kind!r}; choose one of {', '.join(GUIDANCE_KINDS)}")
    interval = req.guidance_interval
    if interval is None:
        interval = (0.0, 1.0) if semantics == "diffsynth" else tuple(defaults.guidance_interval)
    if (isinstance(interval, (str, bytes)) or not isinstance(interval, Sequence) or len(interval) != 2):
        raise ValueError(f"guidance_interval must be a (start, end) pair in [0, 1], got {interval!r}")
    lo, hi = (_number(v, "guidance_interval", 0.0, 1.0) for v in interval)
    if lo > hi:
        raise ValueError(f"guidance_interval start {lo} is after its end {hi}")
    if kind is None:
        if semantics == "diffsynth":
            scale = defaults.guidance_scale if scale is None else scale
            kind = "cfg" if scale != 1.0 else "none"
        else:
            kind = defaults.guidance
            if kind == "none":
                if scale is not None and scale != 1.0:
                    warnings.warn(f"cfg_scale={scale} is ignored: this model samples without guidance (official "
                                  f"turbo); pass guidance='cfg' or 'apg' to force it", stacklevel=4)
                scale = 1.0
            elif scale is None:
                scale = defaults.guidance_scale
    elif kind == "none":
        scale = 1.0
    elif scale is None:
        if defaults.guidance == "none":
            raise ValueError(f"guidance={kind!r} needs cfg_scale: this model has no default guidance scale")
        scale = defaults.guidance_scale
    return Guidance(kind, float(scale), (lo, hi))


def _text2music_frames(duration: float, semantics: str) -> int:
    if semantics == "diffsynth":
        return round(duration * SAMPLE_RATE / HOP)
    return max(OFFICIAL_MIN_FRAMES, int(round(duration, 1) * SAMPLE_RATE) // HOP)


def plan_request(bundle, req: GenerationRequest, index: int = 0) -> Plan:
    """Check and resolve one request. Raises :class:`RequestError` naming the request and the problem."""
    try:
        return _plan(bundle, req, index)
    except RequestError:
        raise
    except ValueError as e:
        raise RequestError(f"request {index}: {e}") from None


def _plan(bundle, req: GenerationRequest, index: int) -> Plan:
    if not isinstance(req, GenerationRequest):
        raise ValueError(f"expected a GenerationRequest, got {type(req).__name__}")
    defaults = bundle.sampling
    semantics = req.semantics
    if semantics not in SEMANTICS:
        raise ValueError(f"unknown semantics {semantics!r}; choose one of {', '.join(SEMANTICS)}")
    task = req.task_type
    if task not in TASK_TYPES:
        raise ValueError(f"unknown task_type {task!r}; choose one of {', '.join(TASK_TYPES)}")

    # Scalars first: cheap, and a typo should not wait for audio decoding.
    if req.duration is not None:
        d = _number(req.duration, "duration")
        if d <= 0:
            raise ValueError(f"duration must be > 0 seconds, got {req.duration!r}")
        _check_duration(d, "duration")
    strength = _number(req.denoising_strength, "denoising_strength", 0.0, 1.0, lo_open=True)
    cover_strength = _number(req.audio_cover_strength, "audio_cover_strength", 0.0, 1.0)
    _number(req.repainting_strength, "repainting_strength", 0.0, 1.0)
    _number(req.repaint_injection_ratio, "repaint_injection_ratio", 0.0, 1.0)
    _int(req.repaint_crossfade_frames, "repaint_crossfade_frames", 0)
    steps = _int(defaults.steps if req.num_inference_steps is None else req.num_inference_steps,
                 "num_inference_steps", 1)
    shift = _number(defaults.shift if req.shift is None else req.shift, "shift", 0.0, lo_open=True)
    seed = _seed(req.seed)
    rand_device = _generator_device(req.rand_device)
    guidance = _resolve_guidance(req, defaults, semantics)
    schedule = resolve_schedule(semantics=semantics, kind=req.schedule or defaults.schedule, steps=steps,
                                shift=shift, timesteps=req.timesteps, denoising_strength=strength)
    vae_sample = (semantics == "official") if req.vae_sample is None else bool(req.vae_sample)
    # Prompt pieces: format them once now so a bad bpm/keyscale/lyrics fails here, not after the VAE ran.
    lyric_prompt(req.lyrics, req.vocal_language)
    caption_prompt(req.prompt, format_metas(req.bpm, req.timesignature, req.keyscale, req.duration), task)

    codes = None
    if req.audio_code_string is not None:
        if task != "cover":
            raise ValueError(f"audio_code_string is used by task_type='cover', not {task!r}")
        size = math.prod(bundle.config.fsq_input_levels)
        codes = parse_audio_codes(req.audio_code_string, size)
    if task == "cover" and codes is None and req.src_audio is None:
        raise ValueError("task_type='cover' needs src_audio or audio_code_string")
    if task == "repaint" and req.src_audio is None:
        raise ValueError("task_type='repaint' needs src_audio")
    if task == "text2music" and req.src_audio is not None:
        raise ValueError("src_audio is used by task_type 'cover' and 'repaint'; for text2music audio-to-audio pass "
                         "input_audio with denoising_strength < 1")
    ranges = _ranges(req.repainting_ranges) if task == "repaint" else []
    if task != "repaint" and req.repainting_ranges is not None:
        raise ValueError(f"repainting_ranges is used by task_type='repaint', not {task!r}")

    # Audio: decoded now (cheap next to the models) so an unreadable file fails before any model runs.
    src = None
    if req.src_audio is not None and codes is None:
        src = to_stereo_48k(req.src_audio, "src_audio")
        _check_duration(src.shape[-1] / SAMPLE_RATE, "src_audio")
    inp = None if req.input_audio is None else to_stereo_48k(req.input_audio, "input_audio")
    refs_in = req.reference_audios
    if refs_in is not None and (isinstance(refs_in, (str, torch.Tensor, tuple)) or not isinstance(refs_in, Sequence)):
        refs_in = [refs_in]
    rng = random.Random(seed)
    references = []
    for i, ref in enumerate(refs_in or []):
        audio = to_stereo_48k(ref, f"reference_audios[{i}]")
        if not is_silent(audio):  # official drops an all-silent reference
            references.append(reference_clip(audio, rng))
    if strength < 1.0 and inp is None and src is None:
        raise ValueError("denoising_strength < 1 starts from audio: give input_audio (or src_audio for cover/repaint)")

    pad = (0, 0)
    repaint_ranges: list[tuple[float, float]] = []
    repaint_frames: list[tuple[int, int]] = []
    if task == "repaint":
        src_seconds = src.shape[-1] / SAMPLE_RATE
        ranges = [(s, src_seconds if e is None else e) for s, e in ranges]
        for i, (s, e) in enumerate(ranges):
            if e <= s:
                raise ValueError(f"repainting_ranges[{i}] = ({s}, {e}) is empty or inverted: end must be after start")
        pad_left_s = max(0.0, -min(s for s, _ in ranges))
        pad_left = int(pad_left_s * SAMPLE_RATE)
        pad_right = max(int(max(e for _, e in ranges) * SAMPLE_RATE) - src.shape[-1], 0)
        pad = (pad_left, pad_right)
        _check_duration((src.shape[-1] + pad_left + pad_right) / SAMPLE_RATE, "src_audio padded to the repaint ranges")
        if pad_left or pad_right:
            src = torch.nn.functional.pad(src, (pad_left, pad_right))
        repaint_ranges = [(s + pad_left_s, e + pad_left_s) for s, e in ranges]

    # Output length.
    if task == "text2music":
        frames = _text2music_frames(DEFAULT_DURATION_S if req.duration is None else float(req.duration), semantics)
    elif codes is not None:
        frames = 5 * len(codes)
    else:
        frames = src.shape[-1] // HOP
        if task == "cover" and semantics == "diffsynth":
            frames = -(-frames // 5) * 5  # hints are not cropped back to the source length
    _check_duration(frames / FRAMES_PER_SECOND, "the output")
    if task == "repaint":
        for s, e in repaint_ranges:
            a = min(max(int(s * SAMPLE_RATE // HOP), 0), frames - 1)
            repaint_frames.append((a, min(max(int(e * SAMPLE_RATE // HOP), a + 1), frames)))

    if semantics == "diffsynth" or task == "text2music":
        metas_duration = DEFAULT_DURATION_S if req.duration is None else float(req.duration)
    else:
        metas_duration = frames / FRAMES_PER_SECOND
    cover_switch = None
    if task == "cover" and cover_strength < 1.0:
        cover_switch = int(schedule.steps * cover_strength)

    plan = Plan(index=index, request=req, semantics=semantics, task=task, seed=seed, rand_device=rand_device,
                frames=frames, metas_duration=metas_duration, schedule=schedule, guidance=guidance,
                vae_sample=vae_sample, src_audio=src, input_audio=inp, references=references, codes=codes,
                repaint_ranges=repaint_ranges, repaint_frames=repaint_frames, pad_samples=pad,
                cover_switch_step=cover_switch)
    plan.params = _params(plan, steps, shift)
    return plan


def _params(plan: Plan, steps: int, shift: float) -> dict[str, Any]:
    """Every request field (audio described, not copied) and every value the sampler resolved."""
    r = plan.request
    out: dict[str, Any] = {}
    for f in fields(GenerationRequest):
        v = getattr(r, f.name)
        if f.name in ("src_audio", "input_audio"):
            v = describe(v)
        elif f.name == "reference_audios" and v is not None:
            v = [describe(a) for a in (v if isinstance(v, (list, tuple)) else [v])]
        elif isinstance(v, tuple):
            v = list(v)
        out[f.name] = v
    out.update(
        seed=plan.seed,
        num_inference_steps=plan.schedule.steps,
        requested_steps=steps,
        shift=plan.schedule.shift if plan.schedule.shift is not None else shift,
        schedule=plan.schedule.kind,
        timesteps=list(plan.schedule.timesteps),
        schedule_truncated_from=plan.schedule.truncated_from,
        guidance=plan.guidance.kind,
        cfg_scale=plan.guidance.scale,
        guidance_interval=list(plan.guidance.interval),
        frames=plan.frames,
        output_seconds=plan.frames / FRAMES_PER_SECOND,
        metas_duration=plan.metas_duration,
        vae_sample=plan.vae_sample,
        references_used=len(plan.references),
        audio_codes=len(plan.codes) if plan.codes is not None else None,
        repaint_ranges_padded=[list(x) for x in plan.repaint_ranges] or None,
        repaint_frames=[list(x) for x in plan.repaint_frames] or None,
        pad_samples=list(plan.pad_samples),
        cover_switch_step=plan.cover_switch_step,
    )
    return out
