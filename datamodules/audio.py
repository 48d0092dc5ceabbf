"""Load audio as the VAE wants it (stereo, 48 kHz, float32 in [-1, 1]), decoding only the window that is used.

Decoding is libsndfile via soundfile (torchaudio 2.9 has no file reader). The libsndfile 1.2.2 in our venv reads
WAV, FLAC, AIFF, OGG (Vorbis and Opus) and MP3; it cannot read AAC/M4A/WMA/MP4, which get an "unsupported
format" error telling the user to convert them (e.g. ``ffmpeg -i x.m4a x.flac``).

A crop is planned on the 48 kHz timeline from the header alone (``inspect_audio``); ``read_window`` then seeks
to the matching source frames, reads them plus a few resampling-kernel widths either side, and resamples only
that. The result is bit-identical to resampling the whole file and cutting the same window, while memory stays
proportional to the window (an hours-long file costs what its crop costs).

Per-file problems found while decoding are either fatal (``AudioError``: undecodable, non-finite samples,
cut short) or returned as notes for the caller to report (over full scale, silent).
"""

from __future__ import annotations

import logging
import math

import numpy as np
import soundfile as sf
import torch
import torchaudio.functional as AF

from datamodules.audio_info import READABLE, UNSUPPORTED, AudioInfo, decode_error, inspect_audio
from datamodules.errors import AudioError

__all__ = ["SAMPLE_RATE", "HOP", "READABLE", "UNSUPPORTED", "load_audio", "read_window", "crop", "crop_window",
           "to_stereo", "audio_seconds", "resampled_length", "check_encodable", "inspect_audio", "AudioInfo"]

log = logging.getLogger("datamodules")

SAMPLE_RATE = 48_000
HOP = 1920  # VAE samples per latent frame (2*4*4*6*10) -> 25 latent frames per second
SILENT_PEAK = 1e-4  # -80 dBFS: below the noise floor of 16-bit audio plus a little dither


def load_audio(path) -> torch.Tensor:
    """Read a whole audio file as ``[2, N]`` float32 at 48 kHz in [-1, 1] (notes are logged as warnings).

    Mono is duplicated to both sides. More than two channels are downmixed: libsndfile gives no reliable
    channel layout, so we take the first two channels as front left/right (the WAV/FLAC convention) and mix
    every further channel equally into both sides, averaging rather than summing so the peak level stays
    within the inputs' range (no clipping; a 6-channel file comes out somewhat quieter). The official
    pipeline instead keeps the first two channels and drops the rest (docs/pipeline.md §2.5), which loses e.g. the
    centre (dialogue/vocals) channel of a 5.1 mix.

    Raises:
        AudioError: naming the file, if it is missing, in an unsupported format, undecodable, empty, or
            contains NaN/Inf samples.
    """
    audio, notes = read_window(inspect_audio(path))
    for note in notes:
        log.warning("%s", note)
    return audio


def read_window(info: AudioInfo, start: int = 0, length: int | None = None) -> tuple[torch.Tensor, list[str]]:
    """Samples ``[start, start + length)`` of the file's 48 kHz version (the whole file if ``length`` is None).

    Float samples above full scale are scaled down so the window peaks at 1.0 (a gain change keeps the
    waveform; hard clipping would add distortion the model would learn), and a note says by how much. A
    silent window is kept, with a note. The small overshoot that resampling itself can add (ringing of the
    band-limited kernel) is clamped, as before.

    Returns:
        ``([2, length] float32, notes)``; each note names the file.
    """
    if info.frames == 0:
        raise AudioError(f"{info.path}: audio is empty (0 samples)")
    rate = info.samplerate
    if length is None:
        data, offset = _read(info, 0, None), 0
    else:
        first, last, offset = _source_span(info, start, length)
        data = _read(info, first, last, needed=-(-(start + length) * rate // SAMPLE_RATE) - first)
    span = "" if length is None else f" in the window {start / SAMPLE_RATE:.2f}-{(start + length) / SAMPLE_RATE:.2f} s"
    bad = int(np.count_nonzero(~np.isfinite(data)))
    if bad:
        raise AudioError(f"{info.path}: {bad} of {data.size} samples{span} are NaN or Inf")
    peak = max(float(data.max()), -float(data.min())) if data.size else 0.0  # no |data| copy of a long file
    notes = []
    if peak > 1.0:
        data *= np.float32(1.0 / peak)
        notes.append(f"{info.path}: float samples{span} reach {peak:.3f}, {20 * math.log10(peak):.1f} dB above "
                     f"full scale; scaled by {1 / peak:.3f} to peak at full scale (normalised, not clipped)")
    if peak <= SILENT_PEAK:
        level = "all samples are zero" if peak == 0 else f"peak {20 * math.log10(peak):.0f} dBFS"
        notes.append(f"{info.path}: the audio{span} is silent ({level}); it is kept, but training on silence "
                     "teaches the model that this caption sounds like nothing")
    audio = to_stereo(torch.from_numpy(np.ascontiguousarray(data.T)))
    if rate != SAMPLE_RATE:
        audio = AF.resample(audio, rate, SAMPLE_RATE)
    if length is not None:
        audio = audio[:, offset: offset + length]
        if audio.shape[-1] < length:  # the rounding of torchaudio's output length at the very end of the file
            audio = torch.nn.functional.pad(audio, (0, length - audio.shape[-1]))
    return audio.clamp_(-1.0, 1.0).contiguous(), notes


def _source_span(info: AudioInfo, start: int, length: int) -> tuple[int, int, int]:
    """Source frames ``[first, last)`` whose resampling contains 48 kHz samples ``[start, start + length)``, and
    where ``start`` lands in that resampled span.

    torchaudio resamples in blocks: with ``orig/new`` the reduced rate ratio, output block ``k`` (samples
    ``k*new ..``) is a fixed kernel applied to input ``k*orig - width .. (k+1)*orig + width``. Starting the read
    on a block boundary and adding whole blocks of margin wider than the kernel makes every output sample see
    exactly the inputs it sees when the whole file is resampled, hence the same value.
    """
    if not 0 <= start or length < 1 or start + length > resampled_length(info.frames, info.samplerate):
        raise ValueError(f"{info.path}: window [{start}, {start + length}) is outside the file's "
                         f"{resampled_length(info.frames, info.samplerate)} samples at 48 kHz")
    if info.samplerate == SAMPLE_RATE:
        return start, start + length, 0
    g = math.gcd(info.samplerate, SAMPLE_RATE)
    orig, new = info.samplerate // g, SAMPLE_RATE // g
    # torchaudio's kernel half-width is ceil(6 * orig / (0.99 * min(orig, new))) input samples; 8x covers it.
    margin_blocks = -(-(8 * orig // min(orig, new) + orig) // orig)
    first_block = max(0, start // new - margin_blocks)
    last_block = -(-(start + length) // new) + margin_blocks
    first, last = first_block * orig, min(info.frames, last_block * orig)
    return first, last, start - first_block * new


def _read(info: AudioInfo, first: int, last: int | None, needed: int | None = None) -> np.ndarray:
    """Frames ``[first, last)`` as float32 ``[n, C]`` (all frames if ``last`` is None), seeking, not decoding
    what lies before. Fewer frames than ``needed`` means the file ends early: an ``AudioError``."""
    path = info.path
    try:
        with sf.SoundFile(str(path)) as f:
            if first:
                f.seek(first)
            data = f.read(-1 if last is None else last - first, dtype="float32", always_2d=True)
    except (sf.LibsndfileError, RuntimeError) as e:
        raise decode_error(path, e) from e
    if last is not None and data.shape[0] < last - first:
        if data.shape[0] < needed:
            raise AudioError(f"{path}: cut short: the header promises {info.frames} frames but decoding stops "
                             f"at {first + data.shape[0]}; is the file truncated?")
        # Lossy decoders may deliver a few frames fewer than the header's estimate; only the margin is missing.
        data = np.pad(data, ((0, last - first - data.shape[0]), (0, 0)))
    if data.shape[0] == 0:
        raise AudioError(f"{path}: audio is empty (0 samples)")
    return data


def resampled_length(frames: int, rate: int) -> int:
    """Samples of a ``frames``-long file at 48 kHz (exact integer ceil of ``frames * 48000 / rate``)."""
    return -(-frames * SAMPLE_RATE // rate)


def check_encodable(info: AudioInfo) -> None:
    """Refuse, from the header alone, a file too short to give the VAE one latent frame (40 ms)."""
    if info.frames == 0:
        raise AudioError(f"{info.path}: audio is empty (0 samples)")
    if resampled_length(info.frames, info.samplerate) < HOP:
        raise AudioError(f"{info.path}: {1000 * info.seconds:.1f} ms of audio is shorter than one latent frame "
                         f"({1000 * HOP / SAMPLE_RATE:.0f} ms, {HOP} samples at 48 kHz); the VAE cannot encode it")


def to_stereo(audio: torch.Tensor) -> torch.Tensor:
    """``[C, N]`` -> ``[2, N]`` (see ``load_audio`` for the downmix rule)."""
    channels = audio.shape[0]
    if channels == 1:
        return audio.expand(2, -1).clone()
    if channels == 2:
        return audio
    rest = audio[2:].sum(dim=0)
    return torch.stack([audio[0] + rest, audio[1] + rest]) / (channels - 1)


def audio_seconds(path) -> float:
    """Duration from the file header, without decoding (used to plan crops before loading)."""
    return inspect_audio(path).seconds


def crop_window(n: int, max_duration: float | None, rng: np.random.Generator) -> tuple[int, int]:
    """``(start, length)`` of a random crop of ``n`` 48 kHz samples to at most ``max_duration`` seconds.

    The crop length is rounded down to whole VAE frames (1920 samples) so the latents cover exactly the
    cropped audio. Audio no longer than that is not cropped: ``(0, n)``.
    """
    if max_duration is None:
        return 0, n
    length = int(max_duration * SAMPLE_RATE) // HOP * HOP
    if length <= 0:
        raise ValueError(f"max_duration={max_duration} is shorter than one latent frame ({HOP / SAMPLE_RATE} s)")
    if n <= length:
        return 0, n
    return int(rng.integers(0, n - length + 1)), length


def crop(audio: torch.Tensor, max_duration: float | None, rng: np.random.Generator) -> tuple[torch.Tensor, float]:
    """Randomly crop decoded ``[2, N]`` 48 kHz audio (see ``crop_window``); returns it and its duration in s."""
    n = audio.shape[-1]
    start, length = crop_window(n, max_duration, rng)
    if length == n:
        return audio, n / SAMPLE_RATE
    return audio[..., start: start + length], length / SAMPLE_RATE
