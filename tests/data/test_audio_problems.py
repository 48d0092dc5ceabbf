"""Per-file audio problems become per-file reports that name the metadata row and the audio file: fatal ones
skip the item under ``on_error="skip"`` (one error under ``"raise"``), the others keep it with a warning that
says what was done."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from datamodules.audio import HOP, SAMPLE_RATE
from datamodules.cache import build_cache
from datamodules.errors import AudioError
from datamodules.manifest import read_manifest
from datamodules.metadata import load_metadata


class StrictEncoder:
    """Refuses audio shorter than one latent frame with a ValueError naming no file, as the VAE wrapper does,
    and records what it was given."""

    model_hash = "strict"
    latent_dim = 64

    def __init__(self) -> None:
        self.audio: dict[str, torch.Tensor] = {}

    def encode(self, audio, records):
        out = []
        for a, r in zip(audio, records):
            n = round(r.duration * SAMPLE_RATE)
            if n < HOP:
                raise ValueError(f"AudioVAE.encode needs at least {HOP} samples (one latent frame), got {n}")
            self.audio[r.audio.name] = a[:, :n].clone()
            out.append({"latents": torch.zeros(n // HOP, 64), "text_hidden": torch.zeros(2, 4),
                        "lyric_embeds": torch.zeros(1, 4)})
        return out


def _tone(seconds: float, rate: int = 48000, amplitude: float = 0.5) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    x = amplitude * np.sin(2 * np.pi * 440 * t)
    return np.stack([x, -x], axis=1).astype(np.float32)


def _dataset(root: Path, files: dict[str, tuple[np.ndarray, int, str]]) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    sf.write(root / "good.wav", _tone(0.5), 48000, subtype="PCM_16")
    for name, (data, rate, subtype) in files.items():
        sf.write(root / name, data, rate, subtype=subtype)
    names = ["good.wav", *files]
    (root / "m.csv").write_text("audio,prompt\n" + "".join(f"{n},caption {i}\n" for i, n in enumerate(names)))
    return root / "m.csv"


def _build(meta: Path, cache: Path, encoder=None, **kw):
    return build_cache(load_metadata(meta), encoder or StrictEncoder(), cache, max_duration=None, seed=0,
                       progress=False, **kw)


def _mentions(caplog: pytest.LogCaptureFixture, name: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if name in r.getMessage()]


@pytest.mark.parametrize("rate, frames", [(48000, HOP - 1), (44100, 1763), (48000, 1)])
def test_clip_shorter_than_a_latent_frame_is_a_per_file_report(tmp_path: Path, caplog, rate, frames) -> None:
    meta = _dataset(tmp_path / "d", {"short.wav": (_tone(1.0, rate)[:frames], rate, "PCM_16")})
    with caplog.at_level(logging.WARNING, logger="datamodules"):
        manifest = _build(meta, tmp_path / "c")
    data = read_manifest(manifest)
    assert [e["row"] for e in data["entries"]] == [2]  # the good file is cached, the run completes
    [skipped] = data["skipped"]
    assert skipped["row"] == 3 and "shorter than one latent frame (40 ms" in skipped["problem"]
    [message] = _mentions(caplog, "short.wav")
    assert message.startswith(f"skipping {meta} row 3: {tmp_path / 'd' / 'short.wav'}: ")
    with pytest.raises(AudioError, match=rf"^{meta} row 3: .*short\.wav: [\d.]+ ms of audio is shorter than one "
                                         r"latent frame \(40 ms, 1920 samples at 48 kHz\)"):
        _build(meta, tmp_path / "c2", on_error="raise")


def test_one_latent_frame_is_enough(tmp_path: Path) -> None:
    meta = _dataset(tmp_path / "d", {"edge.wav": (_tone(1.0, 44100)[:1764], 44100, "PCM_16")})  # exactly 40 ms
    data = read_manifest(_build(meta, tmp_path / "c"))
    assert [e["n_frames"] for e in data["entries"]] == [12, 1] and data["skipped"] == []


def _truncate(path: Path, keep: float) -> None:
    raw = path.read_bytes()
    path.write_bytes(raw[: int(len(raw) * keep)])


@pytest.mark.parametrize("ext", ["wav", "aiff"])
def test_truncated_file_warns_once_and_trains_on_what_is_there(tmp_path: Path, caplog, ext: str) -> None:
    meta = _dataset(tmp_path / "d", {f"cut.{ext}": (_tone(2.0), 48000, "PCM_16")})
    _truncate(tmp_path / "d" / f"cut.{ext}", 0.5)
    encoder = StrictEncoder()
    with caplog.at_level(logging.WARNING, logger="datamodules"):
        data = read_manifest(build_cache(load_metadata(meta, repeat=2), encoder, tmp_path / "c", max_duration=None,
                                         seed=0, progress=False))
    [message] = _mentions(caplog, f"cut.{ext}")  # once, although the row appears twice (repeat=2)
    assert re.fullmatch(rf"{meta} row 3: {tmp_path / 'd'}/cut\.{ext}: truncated: its header declares 2\.000 s "
                        r"\(96000 frames\) but the file holds only 1\.000 s \(479\d\d frames\); using the 1\.000 s "
                        r"that are there", message), message
    # The manifest keeps the warning with each entry it concerns (both copies of row 3).
    assert [(w["row"], w["repeat"]) for w in data["warnings"]] == [(3, 0), (3, 1)]
    kept = [e for e in data["entries"] if e["row"] == 3]
    assert len(kept) == 2 and 0.9 < kept[0]["duration"] < 1.0
    assert encoder.audio[f"cut.{ext}"].shape[-1] == round(kept[0]["duration"] * SAMPLE_RATE)


def test_streamed_wav_with_unknown_size_is_not_called_truncated(tmp_path: Path, caplog) -> None:
    meta = _dataset(tmp_path / "d", {"stream.wav": (_tone(0.5), 48000, "PCM_16")})
    raw = bytearray((tmp_path / "d" / "stream.wav").read_bytes())
    data_at = raw.index(b"data")
    raw[data_at + 4: data_at + 8] = (0xFFFFFFFF).to_bytes(4, "little")  # what a writer to a pipe leaves
    (tmp_path / "d" / "stream.wav").write_bytes(bytes(raw))
    with caplog.at_level(logging.WARNING, logger="datamodules"):
        data = read_manifest(_build(meta, tmp_path / "c"))
    assert _mentions(caplog, "stream.wav") == [] and len(data["entries"]) == 2


def test_float_audio_above_full_scale_is_normalised_not_clipped(tmp_path: Path, caplog) -> None:
    hot = _tone(0.5, amplitude=2.0)
    meta = _dataset(tmp_path / "d", {"hot.wav": (hot, 48000, "FLOAT")})
    encoder = StrictEncoder()
    with caplog.at_level(logging.WARNING, logger="datamodules"):
        data = read_manifest(_build(meta, tmp_path / "c", encoder))
    [message] = _mentions(caplog, "hot.wav")
    assert message.startswith(f"{meta} row 3: {tmp_path / 'd' / 'hot.wav'}: float samples reach 2.000, 6.0 dB "
                              "above full scale; scaled by 0.500 to peak at full scale (normalised, not clipped)")
    assert [(w["row"], w["problem"]) for w in data["warnings"]] == [(3, message[len(f"{meta} row 3: "):])]
    # The waveform is kept (a gain of 1/2), not flattened at +-1.
    assert torch.equal(encoder.audio["hot.wav"], torch.from_numpy(hot.T * np.float32(0.5)))
    assert len(data["entries"]) == 2


def test_silent_clip_is_kept_with_a_warning(tmp_path: Path, caplog) -> None:
    meta = _dataset(tmp_path / "d", {"silent.wav": (np.zeros((24000, 2), np.float32), 48000, "PCM_16"),
                                     "hiss.flac": (_tone(0.5, amplitude=3e-5), 48000, "PCM_24")})
    with caplog.at_level(logging.WARNING, logger="datamodules"):
        data = read_manifest(_build(meta, tmp_path / "c"))
    [silent] = _mentions(caplog, "silent.wav")
    assert silent.startswith(f"{meta} row 3: {tmp_path / 'd' / 'silent.wav'}: the audio is silent "
                             "(all samples are zero); it is kept")
    [hiss] = _mentions(caplog, "hiss.flac")
    assert "the audio is silent (peak -90 dBFS)" in hiss and hiss.startswith(f"{meta} row 4: ")
    assert len(data["entries"]) == 3 and sorted(w["row"] for w in data["warnings"]) == [3, 4]


def test_a_quiet_but_audible_clip_is_not_called_silent(tmp_path: Path, caplog) -> None:
    meta = _dataset(tmp_path / "d", {"quiet.wav": (_tone(0.5, amplitude=1e-3), 48000, "PCM_16")})  # -60 dBFS
    with caplog.at_level(logging.WARNING, logger="datamodules"):
        _build(meta, tmp_path / "c")
    assert _mentions(caplog, "quiet.wav") == []


def test_a_problem_found_while_decoding_is_not_retried_into_a_second_report(tmp_path: Path, caplog) -> None:
    """A file that fails to decode is reported once per build, also when its row is repeated."""
    bad = _tone(0.5)
    bad[100] = np.nan
    meta = _dataset(tmp_path / "d", {"nan.wav": (bad, 48000, "FLOAT")})
    with caplog.at_level(logging.WARNING, logger="datamodules"):
        data = read_manifest(build_cache(load_metadata(meta, repeat=3), StrictEncoder(), tmp_path / "c",
                                         max_duration=None, seed=0, progress=False))
    [message] = _mentions(caplog, "nan.wav")
    assert message.startswith(f"skipping {meta} row 3: ") and "2 of 48000 samples are NaN or Inf" in message
    assert [s["row"] for s in data["skipped"]] == [3, 3, 3]
