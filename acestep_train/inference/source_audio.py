"""Audio in and out of the sampler: input normalisation, the reference (timbre) clip, output level.

Inputs may be a file path (decoded with soundfile, resampled with ``torchaudio.functional.resample``: see
``datamodules.audio.load_audio``), a tensor / array ``[N]``, ``[C, N]`` or ``[1, C, N]`` at 48 kHz, or a
``(tensor, sample_rate)`` pair. All become ``[2, N]`` float32 at 48 kHz clamped to [-1, 1]; mono is duplicated
(official ``_normalize_audio_to_stereo_48k``; DiffSynth only clamps).
"""

from __future__ import annotations

import math
import random
from pathlib import Path
from typing import Any, Union

import numpy as np
import torch
import torchaudio.functional as AF

from datamodules.audio import load_audio, to_stereo
from datamodules.errors import AudioError

SAMPLE_RATE = 48_000
HOP = 1920
REFERENCE_SECONDS = 30
REFERENCE_SEGMENT_SECONDS = 10
SILENCE_PEAK = 1e-6
OUTPUT_DBFS = -1.0

AudioInput = Union[str, Path, torch.Tensor, np.ndarray, tuple]


def describe(value: Any) -> Any:
    """A JSON-friendly stand-in for an audio input (path string or tensor shape) for the resolved params."""
    if value is None:
        return None
    if isinstance(value, (str, Path)):
        return str(value)
    if isinstance(value, tuple) and len(value) == 2:
        return f"{describe(value[0])}@{value[1]}Hz"
    shape = getattr(value, "shape", None)
    return f"{type(value).__name__}{list(shape)}" if shape is not None else type(value).__name__


def to_stereo_48k(value: AudioInput, what: str) -> torch.Tensor:
    """Any accepted audio input -> ``[2, N]`` float32 48 kHz in [-1, 1]. Raises ValueError naming ``what``."""
    rate = SAMPLE_RATE
    if isinstance(value, (str, Path)):
        try:
            audio = load_audio(value)
        except AudioError as e:
            raise ValueError(f"{what}: cannot use this audio file: {e}") from None
        return _check_length(audio, what)
    if isinstance(value, tuple):
        if len(value) != 2 or isinstance(value[1], bool) or not isinstance(value[1], (int, float)) or value[1] <= 0:
            raise ValueError(f"{what}: a tuple must be (audio, sample_rate), got {describe(value)}")
        value, rate = value
        rate = int(rate)
    if isinstance(value, np.ndarray):
        value = torch.from_numpy(np.ascontiguousarray(value))
    if not isinstance(value, torch.Tensor):
        raise ValueError(f"{what}: expected a file path, a tensor/array [C, N] or (audio, sample_rate), "
                         f"got {type(value).__name__}")
    audio = value.detach().to("cpu", torch.float32)
    if audio.dim() == 3 and audio.shape[0] == 1:
        audio = audio[0]
    if audio.dim() == 1:
        audio = audio[None]
    if audio.dim() != 2 or audio.shape[0] > 8 or audio.shape[0] < 1:
        raise ValueError(f"{what}: expected audio shaped [N], [C, N] or [1, C, N] with C <= 8 channels, "
                         f"got {list(value.shape)}")
    if not torch.isfinite(audio).all():
        raise ValueError(f"{what}: audio contains NaN or Inf samples")
    audio = to_stereo(audio)
    if rate != SAMPLE_RATE:
        audio = AF.resample(audio, rate, SAMPLE_RATE)
    return _check_length(audio.clamp(-1.0, 1.0).contiguous(), what)


def _check_length(audio: torch.Tensor, what: str) -> torch.Tensor:
    if audio.shape[-1] < HOP:
        raise ValueError(f"{what}: audio is {audio.shape[-1]} samples long; at least {HOP} (one latent frame, "
                         f"{HOP / SAMPLE_RATE * 1000:.0f} ms) are needed")
    return audio


def is_silent(audio: torch.Tensor) -> bool:
    return bool((audio.abs() < SILENCE_PEAK).all())


def reference_clip(audio: torch.Tensor, rng: random.Random) -> torch.Tensor:
    """Official timbre clip: repeat to >= 30 s, then one random 10 s segment from each third -> ``[2, 1 440 000]``."""
    target = REFERENCE_SECONDS * SAMPLE_RATE
    seg = REFERENCE_SEGMENT_SECONDS * SAMPLE_RATE
    if audio.shape[-1] < target:
        audio = audio.repeat(1, math.ceil(target / audio.shape[-1]))
    total = audio.shape[-1]
    third = total // 3
    starts = [rng.randint(0, max(0, third - seg)),
              third + rng.randint(0, max(0, third - seg)),
              2 * third + rng.randint(0, max(0, total - 2 * third - seg))]
    return torch.cat([audio[:, s:s + seg] for s in starts], dim=-1)


def normalize_output(audio: torch.Tensor, target_db: float = OUTPUT_DBFS) -> torch.Tensor:
    """Official post-processing of one track ``[C, N]``: anti-clip (divide by the peak when it exceeds 1), then
    peak-normalise to ``target_db`` dBFS (skipped for near-silence)."""
    peak = audio.abs().max()
    if peak > 1.0:
        audio = audio / peak
        peak = audio.abs().max()
    if peak < SILENCE_PEAK:
        return audio
    return audio * (10 ** (target_db / 20.0) / peak)
