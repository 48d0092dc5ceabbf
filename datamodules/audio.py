"""Load audio as the VAE wants it (stereo, 48 kHz, float32 in [-1, 1]) and crop it.

Decoding is libsndfile via soundfile (torchaudio 2.9 has no file reader). The libsndfile 1.2.2 in our venv reads
WAV, FLAC, AIFF, OGG (Vorbis and Opus) and MP3; it cannot read AAC/M4A/WMA/MP4, which get an "unsupported
format" error telling the user to convert them (e.g. ``ffmpeg -i x.m4a x.flac``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import soundfile as sf
import torch
import torchaudio.functional as AF

from datamodules.errors import AudioError

SAMPLE_RATE = 48_000
HOP = 1920  # VAE samples per latent frame (2*4*4*6*10) -> 25 latent frames per second
READABLE = (".wav", ".flac", ".aif", ".aiff", ".ogg", ".oga", ".opus", ".mp3")
# Containers libsndfile has no decoder for: fail with a clear message instead of libsndfile's
# "Format not recognised".
UNSUPPORTED = (".m4a", ".aac", ".mp4", ".wma", ".webm", ".mka", ".ac3", ".alac")


def load_audio(path: str | Path) -> torch.Tensor:
    """Read an audio file as ``[2, N]`` float32 at 48 kHz, clamped to [-1, 1].

    Mono is duplicated to both sides. More than two channels are downmixed: libsndfile gives no reliable
    channel layout, so we take the first two channels as front left/right (the WAV/FLAC convention) and mix
    every further channel equally into both sides, averaging rather than summing so the peak level stays
    within the inputs' range (no clipping; a 6-channel file comes out somewhat quieter). The official
    pipeline instead keeps the first two channels and drops the rest (pipeline.md §2.5), which loses e.g. the
    centre (dialogue/vocals) channel of a 5.1 mix.

    Raises:
        AudioError: naming the file, if it is missing, in an unsupported format, undecodable, empty, or
            contains NaN/Inf samples.
    """
    path = Path(path)
    data, rate = _read(path)
    if data.shape[0] == 0:
        raise AudioError(f"{path}: audio is empty (0 samples)")
    bad = int(np.count_nonzero(~np.isfinite(data)))
    if bad:
        raise AudioError(f"{path}: {bad} of {data.size} samples are NaN or Inf")
    audio = torch.from_numpy(np.ascontiguousarray(data.T))  # [C, N]
    audio = to_stereo(audio)
    if rate != SAMPLE_RATE:
        audio = AF.resample(audio, rate, SAMPLE_RATE)
    # Resampling can overshoot slightly and float files may exceed full scale; the VAE expects [-1, 1].
    return audio.clamp_(-1.0, 1.0).contiguous()


def to_stereo(audio: torch.Tensor) -> torch.Tensor:
    """``[C, N]`` -> ``[2, N]`` (see ``load_audio`` for the downmix rule)."""
    channels = audio.shape[0]
    if channels == 1:
        return audio.expand(2, -1).clone()
    if channels == 2:
        return audio
    rest = audio[2:].sum(dim=0)
    return torch.stack([audio[0] + rest, audio[1] + rest]) / (channels - 1)


def audio_seconds(path: str | Path) -> float:
    """Duration from the file header, without decoding (used to plan crops before loading)."""
    path = Path(path)
    _check_path(path)
    try:
        info = sf.info(str(path))
    except (sf.LibsndfileError, RuntimeError) as e:
        raise _decode_error(path, e) from e
    return info.frames / info.samplerate


def crop(audio: torch.Tensor, max_duration: float | None, rng: np.random.Generator) -> tuple[torch.Tensor, float]:
    """Randomly crop ``[2, N]`` 48 kHz audio to at most ``max_duration`` seconds.

    The crop length is rounded down to whole VAE frames (1920 samples) so the latents cover exactly the
    cropped audio. Audio no longer than that is returned unchanged.

    Returns:
        The (possibly) cropped audio and its actual duration in seconds.
    """
    n = audio.shape[-1]
    if max_duration is None:
        return audio, n / SAMPLE_RATE
    length = int(max_duration * SAMPLE_RATE) // HOP * HOP
    if length <= 0:
        raise ValueError(f"max_duration={max_duration} is shorter than one latent frame ({HOP / SAMPLE_RATE} s)")
    if n <= length:
        return audio, n / SAMPLE_RATE
    start = int(rng.integers(0, n - length + 1))
    return audio[..., start : start + length], length / SAMPLE_RATE


def _check_path(path: Path) -> None:
    if not path.is_file():
        raise AudioError(f"{path}: audio file not found")
    if path.suffix.lower() in UNSUPPORTED:
        raise AudioError(
            f"{path}: unsupported audio format {path.suffix!r}; libsndfile reads {', '.join(READABLE)} "
            f"(convert with e.g. ffmpeg -i in{path.suffix} out.flac)"
        )


def _read(path: Path) -> tuple[np.ndarray, int]:
    _check_path(path)
    try:
        return sf.read(str(path), dtype="float32", always_2d=True)
    except (sf.LibsndfileError, RuntimeError) as e:
        raise _decode_error(path, e) from e


def _decode_error(path: Path, e: Exception) -> AudioError:
    if path.suffix.lower() not in READABLE:
        return AudioError(f"{path}: unsupported audio format {path.suffix!r} ({e}); readable: {', '.join(READABLE)}")
    return AudioError(f"{path}: cannot decode audio ({e})")
