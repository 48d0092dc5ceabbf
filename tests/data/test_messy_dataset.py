"""A real-world folder of songs: good files in every format, rate, sample type and channel layout we read, plus
one of each problem a user's folder holds. Trained through the real config (tiny model, real preprocessing
encoder): every bad file is reported exactly once with its metadata row, its file and the reason; every good
file is cached; the run completes."""

from __future__ import annotations

import csv
import json
import logging
import warnings
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from train_helpers import run_train, tiny_overrides

# name -> (format, subtype, sample rate, channels, seconds). Formats this libsndfile cannot write are left out.
GOOD = {
    "pcm16_48k_stereo.wav": ("WAV", "PCM_16", 48000, 2, 1.0),
    "float_44k_mono.wav": ("WAV", "FLOAT", 44100, 1, 1.0),
    "pcm24_32k_5.1.wav": ("WAV", "PCM_24", 32000, 6, 1.0),
    "pcm24_96k_stereo.flac": ("FLAC", "PCM_24", 96000, 2, 1.0),
    "pcm16_22k_mono.flac": ("FLAC", "PCM_16", 22050, 1, 1.0),
    "pcm16_48k_stereo.aiff": ("AIFF", "PCM_16", 48000, 2, 1.0),
    "vorbis_44k_stereo.ogg": ("OGG", "VORBIS", 44100, 2, 1.0),
    "opus_48k_mono.opus": ("OGG", "OPUS", 48000, 1, 1.0),
    "mp3_44k_stereo.mp3": ("MP3", "MPEG_LAYER_III", 44100, 2, 1.0),
    "long_float_48k_stereo.wav": ("WAV", "FLOAT", 48000, 2, 4.5),  # longer than max_duration=3: cropped
}
# name -> (what happens, words the report must contain)
BAD = {
    "too_short.wav": ("skipped", "shorter than one latent frame"),
    "truncated.wav": ("warned", "truncated: its header declares"),
    "clipped.wav": ("warned", "above full scale; scaled by 0.667"),
    "silent.flac": ("warned", "is silent (all samples are zero)"),
    "non_finite.wav": ("skipped", "samples are NaN or Inf"),
    "undecodable.flac": ("skipped", "cannot decode audio"),
    "bad_metas.wav": ("warned", "bpm 'fast' is not a number; keyscale 'Z major' does not parse"),
    "missing.wav": ("dropped", "audio file not found"),
}


def _tone(seconds: float, rate: int, channels: int, freq: float, amplitude: float = 0.5) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    return np.stack([amplitude * np.sin(2 * np.pi * freq * (c + 1) * t) for c in range(channels)], 1).astype(np.float32)


def _write_good(root: Path) -> list[str]:
    written = []
    for i, (name, (fmt, subtype, rate, channels, seconds)) in enumerate(GOOD.items()):
        if subtype not in sf.available_subtypes(fmt):
            continue
        sf.write(root / name, _tone(seconds, rate, channels, 220 + 40 * i), rate, format=fmt, subtype=subtype)
        written.append(name)
    return written


def _write_bad(root: Path) -> None:
    sf.write(root / "too_short.wav", _tone(0.02, 48000, 2, 440), 48000, subtype="PCM_16")
    sf.write(root / "truncated.wav", _tone(2.0, 48000, 2, 330), 48000, subtype="PCM_16")
    raw = (root / "truncated.wav").read_bytes()
    (root / "truncated.wav").write_bytes(raw[: len(raw) // 2])  # an interrupted copy
    sf.write(root / "clipped.wav", _tone(1.0, 48000, 2, 550, amplitude=1.5), 48000, subtype="FLOAT")
    sf.write(root / "silent.flac", np.zeros((48000, 2), np.float32), 48000, subtype="PCM_16")
    nan = _tone(1.0, 44100, 2, 660)
    nan[1000:1010] = np.nan
    sf.write(root / "non_finite.wav", nan, 44100, subtype="FLOAT")
    (root / "undecodable.flac").write_bytes(b"fLaC" + bytes(range(256)) * 8)
    sf.write(root / "bad_metas.wav", _tone(1.0, 48000, 2, 770), 48000, subtype="PCM_16")


@pytest.fixture(scope="module")
def messy(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("messy")
    songs = root / "songs"
    songs.mkdir()
    good = _write_good(songs)
    assert {"pcm16_48k_stereo.wav", "pcm24_96k_stereo.flac", "float_44k_mono.wav", "pcm24_32k_5.1.wav"} <= set(good)
    _write_bad(songs)
    names = good + list(BAD)
    meta = songs / "metadata.csv"
    with meta.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["audio", "prompt", "lyrics", "bpm", "keyscale", "timesignature", "vocal_language"])
        for i, name in enumerate(names):
            bad_metas = name == "bad_metas.wav"
            w.writerow([name, f"song {i}, {name}", "[verse] la la la" if i % 2 else "[Instrumental]",
                        "fast" if bad_metas else 90 + i, "Z major" if bad_metas else "A minor", "4", "en"])
    rows = {name: i + 2 for i, name in enumerate(names)}  # the header is row 1
    return {"metadata": meta, "cache": root / "cache", "good": good, "rows": rows}


def test_messy_folder_reports_each_bad_file_once_and_trains(messy: dict, tmp_path: Path, caplog) -> None:
    with caplog.at_level(logging.WARNING, logger="datamodules"), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = run_train(tmp_path / "run", tiny_overrides(messy, ["debug=fdr"]))
    assert (out["output_dir"] / "run.json").is_file()  # the run completed

    reports = [r.getMessage() for r in caplog.records] + [str(w.message) for w in caught]
    meta, rows = messy["metadata"], messy["rows"]
    for name, (action, reason) in BAD.items():
        mentions = [m for m in reports if name in m]
        assert len(mentions) == 1, (name, mentions)
        [message] = mentions
        assert f"{meta} row {rows[name]}" in message and reason in message, (name, message)
        assert message.startswith("skipping ") == (action in ("skipped", "dropped")), message
    for name in messy["good"]:
        assert not [m for m in reports if name in m], name  # good files draw no report

    [manifest] = list(Path(messy["cache"]).glob("manifest-*.json"))
    data = json.loads(manifest.read_text())
    cached = {e["row"] for e in data["entries"]}
    kept = [n for n, (action, _) in BAD.items() if action == "warned"]
    assert cached == {rows[n] for n in messy["good"] + kept}
    assert sorted(s["row"] for s in data["skipped"]) == sorted(rows[n] for n, (a, _) in BAD.items() if a == "skipped")
    audio_warned = {"truncated.wav", "clipped.wav", "silent.flac"}
    assert sorted(w["row"] for w in data["warnings"]) == sorted(rows[n] for n in audio_warned)
    long = next(e for e in data["entries"] if e["row"] == rows["long_float_48k_stereo.wav"])
    assert long["duration"] == 3.0 and long["n_frames"] == 75  # the 4.5 s file cropped to max_duration=3 s
