"""Windowed decoding: the cache reads and resamples only the crop it uses, and gets exactly the samples that
decoding and resampling the whole file would have given for that window."""

from __future__ import annotations

import math
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from datamodules.audio import HOP, SAMPLE_RATE, crop, inspect_audio, load_audio, read_window, resampled_length
from datamodules.cache import build_cache
from datamodules.metadata import load_metadata


def _noise(frames: int, rate: int, channels: int, seed: int = 0) -> np.ndarray:
    # Broadband content: every resampling-kernel tap matters, so an off-by-one window would show.
    return np.random.default_rng(seed).uniform(-0.9, 0.9, (frames, channels)).astype(np.float32)


@pytest.mark.parametrize("rate, channels, subtype", [
    (48000, 2, "PCM_16"), (44100, 2, "FLOAT"), (44100, 1, "PCM_16"), (22050, 6, "PCM_24"), (96000, 2, "PCM_24"),
    (16000, 1, "FLOAT"), (11025, 2, "PCM_16")])
def test_window_equals_the_same_window_of_the_whole_file(tmp_path: Path, rate: int, channels: int,
                                                         subtype: str) -> None:
    path = tmp_path / "x.wav"
    sf.write(path, _noise(int(rate * 2.3) + 7, rate, channels), rate, subtype=subtype)
    whole = load_audio(path)
    info = inspect_audio(path)
    n = whole.shape[-1]
    assert abs(n - resampled_length(info.frames, rate)) <= 1  # torchaudio rounds its length in float32
    windows = [(0, HOP), (0, 48000), (n - 48000, 48000), (n - HOP, HOP), (12345, 40000), (1, 77), (0, n)]
    windows += [(int(s), 25 * HOP) for s in np.random.default_rng(rate).integers(0, n - 25 * HOP, 3)]
    for start, length in windows:
        window, notes = read_window(info, start, length)
        assert notes == []
        assert torch.equal(window, whole[:, start:start + length]), (start, length)


def test_cached_crop_is_the_window_of_the_whole_decode(tmp_path: Path) -> None:
    """Through the cache: what the encoder receives for a cropped item is a window of the whole decode."""
    data = tmp_path / "data"
    data.mkdir()
    sf.write(data / "long.flac", _noise(44100 * 5, 44100, 2), 44100, subtype="PCM_16")
    (data / "m.csv").write_text("audio,prompt\nlong.flac,noise\n")
    records = load_metadata(data / "m.csv", repeat=3)
    seen: list[torch.Tensor] = []

    class Recorder:
        model_hash = "recorder"
        latent_dim = 64

        def encode(self, audio, recs):
            out = []
            for a, r in zip(audio, recs):
                n = round(r.duration * SAMPLE_RATE)
                seen.append(a[:, :n].clone())
                out.append({"latents": torch.zeros(n // HOP, 64), "text_hidden": torch.zeros(1, 4),
                            "lyric_embeds": torch.zeros(1, 4)})
            return out

    build_cache(records, Recorder(), tmp_path / "cache", max_duration=1.5, seed=3, progress=False)
    whole = load_audio(data / "long.flac")
    assert len(seen) == 3 and all(s.shape == (2, 37 * HOP) for s in seen)  # 1.5 s rounded down to whole frames
    starts = []
    for s in seen:
        # Locate the window by its first samples, then require the whole window to match bit for bit.
        hits = torch.nonzero((whole[0] == s[0, 0]) & (whole[1] == s[1, 0])).flatten().tolist()
        match = [h for h in hits if torch.equal(whole[:, h:h + s.shape[-1]], s)]
        assert len(match) == 1
        starts.append(match[0])
    assert len(set(starts)) == 3  # each repeat copy has its own crop


def _write_long_wav(path: Path, minutes: int, rate: int = 44100) -> None:
    """A long stereo int16 WAV written a minute at a time (the test must not hold the file in memory)."""
    block = rate * 60
    t = np.arange(block) / rate
    with sf.SoundFile(path, "w", samplerate=rate, channels=2, subtype="PCM_16") as f:
        for m in range(minutes):
            tone = 0.4 * np.sin(2 * np.pi * (220 + 10 * m) * t)
            f.write((np.stack([tone, -tone], axis=1) * 32767).astype(np.int16))


def _peak_rss_kib() -> int | None:
    try:
        status = Path("/proc/self/status").read_text()
    except OSError:
        return None
    return int(next(line for line in status.splitlines() if line.startswith("VmHWM")).split()[1])


def _reset_peak_rss() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS (Linux)
        return True
    except OSError:
        return False


def test_a_long_file_is_cached_in_memory_proportional_to_the_crop(tmp_path: Path) -> None:
    """20 minutes of 44.1 kHz stereo: decoding it whole as float32 takes 423 MB and resampling another 460 MB.
    Cropping 10 s must cost a few MB."""
    data = tmp_path / "data"
    data.mkdir()
    _write_long_wav(data / "long.wav", minutes=20)
    (data / "m.csv").write_text("audio,prompt\nlong.wav,a very long song\n")
    records = load_metadata(data / "m.csv")

    class Shapes:
        model_hash = "shapes"
        latent_dim = 64

        def encode(self, audio, recs):
            self.shape = tuple(audio.shape)
            return [{"latents": torch.zeros(audio.shape[-1] // HOP, 64), "text_hidden": torch.zeros(1, 4),
                     "lyric_embeds": torch.zeros(1, 4)}]

    encoder = Shapes()
    rss_ok = _reset_peak_rss()
    before = _peak_rss_kib()
    tracemalloc.start()
    try:
        build_cache(records, encoder, tmp_path / "cache", max_duration=10.0, seed=0, progress=False)
        _, traced_peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert encoder.shape == (1, 2, 10 * SAMPLE_RATE)
    # numpy buffers (the decoded samples) are traced; a whole-file decode alone would be 423 MB.
    assert traced_peak < 30e6, f"peak traced allocation {traced_peak / 1e6:.0f} MB"
    if rss_ok and before is not None:
        grown_mb = (_peak_rss_kib() - before) / 1024
        assert grown_mb < 120, f"peak RSS grew by {grown_mb:.0f} MB"


def test_crop_of_decoded_audio_still_works_as_before() -> None:
    audio = torch.arange(3 * SAMPLE_RATE, dtype=torch.float32).expand(2, -1)
    out, seconds = crop(audio, 1.0, np.random.default_rng(0))
    assert out.shape == (2, 25 * HOP) and math.isclose(seconds, 1.0)
