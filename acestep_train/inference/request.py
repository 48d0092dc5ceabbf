"""What to generate (:class:`GenerationRequest`) and its checked, fully resolved form (:class:`Plan`).

``plan_request`` does every check and every cheap preparation (decoding audio files, parsing codes, resolving
defaults and the schedule) so that a bad request fails with one clear :class:`RequestError` before any model runs.

Parameters follow DiffSynth's ``AceStepPipeline.__call__`` (same names and defaults where they exist) plus the
official-pipeline knobs. ``None`` means "the model's :class:`~acestep_train.checkpoints.loading.SamplingDefaults`" for steps,
shift, schedule and guidance; ``semantics`` picks the official behaviour (default) or DiffSynth's where the two
differ: the rules are methods of :class:`~acestep_train.conditioning.tasks.Semantics` (table there), the per-task
behaviour (context latents, repaint, cover switch) lives in the task classes of :mod:`acestep_train.conditioning.tasks`.
Planning turns the request into a :class:`Plan` holding a task object; the sampler never reads the request again.

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
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from typing import Any

import torch

from acestep_train.conditioning.prompts import caption_prompt, format_metas, lyric_prompt
from acestep_train.conditioning.tasks import TASKS, Semantics, Task, semantics_named
from acestep_train.conditioning.tasks.semantics import SEMANTICS as _SEMANTICS
from acestep_train.inference.source_audio import HOP, SAMPLE_RATE, AudioInput, describe, is_silent, reference_clip, to_stereo_48k
from acestep_train.inference.codes import parse_audio_codes
from acestep_train.inference.guidance import GUIDANCE_KINDS, Guidance
from acestep_train.inference.schedules import Schedule, resolve_schedule
from acestep_train.inference.tasks import (DEFAULT_DURATION_S, MAX_DURATION_S, TASK_BUILDERS,  # noqa: F401 (public)
                                          check_duration)

TASK_TYPES = tuple(TASKS)
SEMANTICS = tuple(_SEMANTICS)
FRAMES_PER_SECOND = SAMPLE_RATE / HOP  # 25


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


@dataclass(frozen=True)
class PromptFields:
    """What the caption and lyric prompts are made of (the instruction and metas duration come from the plan)."""

    caption: str
    lyrics: str
    bpm: Any
    keyscale: Any
    timesignature: Any
    vocal_language: str

    @classmethod
    def of(cls, req: GenerationRequest) -> PromptFields:
        return cls(req.prompt, req.lyrics, req.bpm, req.keyscale, req.timesignature, req.vocal_language)


@dataclass
class Plan:
    """A checked request with every value resolved; nothing reads the request after planning. Audio is decoded to
    ``[2, N]`` 48 kHz float32 (CPU); the task object holds its own inputs (source audio, codes, ranges)."""

    index: int
    semantics: Semantics
    task: Task
    seed: int
    rand_device: str
    frames: int  # latent frames of the output
    metas_duration: float
    schedule: Schedule
    guidance: Guidance
    vae_sample: bool
    denoising_strength: float
    prompt: PromptFields
    input_audio: torch.Tensor | None = None  # audio-to-audio start point
    references: list[torch.Tensor] = field(default_factory=list)  # 30 s clips (silent ones dropped)
    params: dict[str, Any] = field(default_factory=dict)

    def condition_fields(self, task: str | None = None) -> dict[str, Any]:
        """The fields of the condition encoder's prompts; ``task`` replaces the task's own instruction."""
        p = self.prompt
        return dict(caption=p.caption, lyrics=p.lyrics, bpm=p.bpm, keyscale=p.keyscale, timesignature=p.timesignature,
                    duration=self.metas_duration, vocal_language=p.vocal_language, task=task or self.task.name)

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

def _resolve_guidance(req: GenerationRequest, defaults, semantics: Semantics) -> Guidance:
    kind, scale = req.guidance, req.cfg_scale
    if scale is not None:
        scale = _number(scale, "cfg_scale", 0.0)
    if kind is not None and kind not in GUIDANCE_KINDS:
        raise ValueError(f"unknown guidance {kind!r}; choose one of {', '.join(GUIDANCE_KINDS)}")
    interval = req.guidance_interval
    if interval is None:
        interval = semantics.guidance_interval(defaults)
    if (isinstance(interval, (str, bytes)) or not isinstance(interval, Sequence) or len(interval) != 2):
        raise ValueError(f"guidance_interval must be a (start, end) pair in [0, 1], got {interval!r}")
    lo, hi = (_number(v, "guidance_interval", 0.0, 1.0) for v in interval)
    if lo > hi:
        raise ValueError(f"guidance_interval start {lo} is after its end {hi}")
    if kind is None:
        kind, scale = semantics.default_guidance(scale, defaults)
    elif kind == "none":
        scale = 1.0
    elif scale is None:
        if defaults.guidance == "none":
            raise ValueError(f"guidance={kind!r} needs cfg_scale: this model has no default guidance scale")
        scale = defaults.guidance_scale
    return Guidance(kind, float(scale), (lo, hi))


@dataclass
class _Knobs:
    """The checked numeric parameters of a request."""

    denoising_strength: float
    cover_strength: float
    repainting_strength: float
    injection_ratio: float
    crossfade_frames: int
    steps: int
    shift: float


def _check_knobs(req: GenerationRequest, defaults) -> _Knobs:
    if req.duration is not None:
        d = _number(req.duration, "duration")
        if d <= 0:
            raise ValueError(f"duration must be > 0 seconds, got {req.duration!r}")
        check_duration(d, "duration")
    return _Knobs(
        denoising_strength=_number(req.denoising_strength, "denoising_strength", 0.0, 1.0, lo_open=True),
        cover_strength=_number(req.audio_cover_strength, "audio_cover_strength", 0.0, 1.0),
        repainting_strength=_number(req.repainting_strength, "repainting_strength", 0.0, 1.0),
        injection_ratio=_number(req.repaint_injection_ratio, "repaint_injection_ratio", 0.0, 1.0),
        crossfade_frames=_int(req.repaint_crossfade_frames, "repaint_crossfade_frames", 0),
        steps=_int(defaults.steps if req.num_inference_steps is None else req.num_inference_steps,
                   "num_inference_steps", 1),
        shift=_number(defaults.shift if req.shift is None else req.shift, "shift", 0.0, lo_open=True))


@dataclass
class _Inputs:
    """A request's audio and codes, decoded and checked (audio ``[2, N]`` 48 kHz float32 CPU)."""

    codes: list[int] | None
    src: torch.Tensor | None
    input_audio: torch.Tensor | None
    references: list[torch.Tensor]
    ranges: list[tuple[float, float | None]]


def _check_task_inputs(bundle, req: GenerationRequest, task: str) -> tuple[list[int] | None, list]:
    """Which inputs the task takes (codes parsed, ranges checked): a misplaced one fails before audio decodes."""
    codes = None
    if req.audio_code_string is not None:
        if task != "cover":
            raise ValueError(f"audio_code_string is used by task_type='cover', not {task!r}")
        codes = parse_audio_codes(req.audio_code_string, math.prod(bundle.config.fsq_input_levels))
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
    return codes, ranges


def _read_inputs(bundle, req: GenerationRequest, seed: int, strength: float) -> _Inputs:
    codes, ranges = _check_task_inputs(bundle, req, req.task_type)
    # Audio: decoded now (cheap next to the models) so an unreadable file fails before any model runs.
    src = None
    if req.src_audio is not None and codes is None:
        src = to_stereo_48k(req.src_audio, "src_audio")
        check_duration(src.shape[-1] / SAMPLE_RATE, "src_audio")
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
    return _Inputs(codes, src, inp, references, ranges)


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
    semantics = semantics_named(req.semantics)
    if req.task_type not in TASK_TYPES:
        raise ValueError(f"unknown task_type {req.task_type!r}; choose one of {', '.join(TASK_TYPES)}")
    # Scalars first: cheap, and a typo should not wait for audio decoding.
    knobs = _check_knobs(req, defaults)
    seed = _seed(req.seed)
    rand_device = _generator_device(req.rand_device)
    guidance = _resolve_guidance(req, defaults, semantics)
    schedule = resolve_schedule(semantics=semantics.name, kind=req.schedule or defaults.schedule, steps=knobs.steps,
                                shift=knobs.shift, timesteps=req.timesteps,
                                denoising_strength=knobs.denoising_strength)
    # Prompt pieces: format them once now so a bad bpm/keyscale/lyrics fails here, not after the VAE ran.
    lyric_prompt(req.lyrics, req.vocal_language)
    caption_prompt(req.prompt, format_metas(req.bpm, req.timesignature, req.keyscale, req.duration), req.task_type)
    inputs = _read_inputs(bundle, req, seed, knobs.denoising_strength)
    task, frames = TASK_BUILDERS[req.task_type](req, semantics, inputs, schedule, knobs)
    check_duration(frames / FRAMES_PER_SECOND, "the output")
    requested = DEFAULT_DURATION_S if req.duration is None else float(req.duration)
    plan = Plan(index=index, semantics=semantics, task=task, seed=seed, rand_device=rand_device, frames=frames,
                metas_duration=semantics.metas_duration(requested, frames / FRAMES_PER_SECOND, task.length_from_audio),
                schedule=schedule, guidance=guidance,
                vae_sample=semantics.vae_sample if req.vae_sample is None else bool(req.vae_sample),
                denoising_strength=knobs.denoising_strength, prompt=PromptFields.of(req),
                input_audio=inputs.input_audio, references=inputs.references)
    plan.params = _params(req, plan, knobs.steps, knobs.shift)
    return plan


def _params(req: GenerationRequest, plan: Plan, steps: int, shift: float) -> dict[str, Any]:
    """Every request field (audio described, not copied) and every value the sampler resolved."""
    out: dict[str, Any] = {}
    for f in fields(GenerationRequest):
        v = getattr(req, f.name)
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
        **plan.task.params(),
    )
    return out
