"""A tiny synthetic music dataset for smoke tests and demos (no downloads, deterministic per seed).

Each clip is a short loop in its own key, tempo and metre: a bass line on the chord roots, pad chords, a
plucked lead on scale notes and a kick/hi-hat pattern on the beat grid. The metadata CSV uses the default
column names of ``load_metadata`` so it loads without a ``fields`` mapping. Files vary on purpose to exercise
the loader: clip 1 is a 44.1 kHz FLAC (resampling path), clip 2 is mono (channel duplication).
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import soundfile as sf

_SEMITONE = {"C": 0, "D": 2, "Eb": 3, "E": 4, "F": 5, "F#": 6, "G": 7, "A": 9, "Bb": 10}
_KEYS = ["A minor", "F# minor", "Bb major", "C major", "E minor", "D major", "G major", "Eb major", "D minor"]
_SCALES = {"major": [0, 2, 4, 5, 7, 9, 11], "minor": [0, 2, 3, 5, 7, 8, 10]}
# Scale-degree roots of a four-bar progression: I-V-vi-IV in major, i-VI-III-VII in minor.
_PROGRESSIONS = {"major": [0, 4, 5, 3], "minor": [0, 5, 2, 6]}
_GENRES = ["synth-pop", "lo-fi", "chiptune", "house", "ambient pop", "indie electronic"]
_LYRICS = (
    "[verse]\nunder the neon light\nwe keep the rhythm tight\n[chorus]\nhold on, hold on tonight",
    "[verse]\nslow waves on the shore\nsilver skies and nothing more",
    "[chorus]\nrun, run, run away\nfind the sun another day",
)
_COLUMNS = ["audio", "prompt", "lyrics", "bpm", "keyscale", "timesignature", "vocal_language", "duration"]


def make_demo_dataset(root: str | Path, n: int = 8, seconds: float = 4.0, seed: int = 0) -> Path:
    """Write ``n`` synthetic clips of ``seconds`` each plus ``metadata.csv`` under ``root``.

    Returns:
        The path of ``metadata.csv`` (audio paths in it are relative to ``root``).
    """
    if n < 1 or seconds <= 0:
        raise ValueError(f"need n >= 1 and seconds > 0, got n={n}, seconds={seconds}")
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        rng = np.random.default_rng([seed, i])
        keyscale = _KEYS[(seed + i) % len(_KEYS)]
        bpm = int(rng.integers(80, 141))
        beats_per_bar = 3 if i % 3 == 2 else 4
        rate = 44_100 if i == 1 else 48_000
        audio = _render(rng, keyscale, bpm, beats_per_bar, seconds, rate)
        if i == 2:
            audio = audio.mean(axis=1, keepdims=True)
        name = f"clip_{i:02d}.flac" if i == 1 else f"clip_{i:02d}.wav"
        sf.write(root / name, audio, rate, subtype="PCM_16")
        genre = _GENRES[int(rng.integers(len(_GENRES)))]
        prompt = (f"instrumental {genre} loop, deep bass line, warm pad chords, plucked lead melody, "
                  f"kick and hi-hat groove, {'waltz feel' if beats_per_bar == 3 else 'steady 4/4 beat'}")
        # Every other clip carries sung-style lyrics (the demo "vocals" are the lead synth), so both lyric
        # branches — real lyrics and the instrumental tag — are exercised.
        lyrics, language = ("[Instrumental]", "unknown") if i % 2 else (_LYRICS[i // 2 % len(_LYRICS)], "en")
        rows.append([name, prompt, lyrics, bpm, keyscale, beats_per_bar, language, seconds])
    path = root / "metadata.csv"
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(_COLUMNS)
        writer.writerows(rows)
    return path


def _render(rng: np.random.Generator, keyscale: str, bpm: int, beats: int, seconds: float, rate: int) -> np.ndarray:
    note_name, mode = keyscale.split()
    tonic = _SEMITONE[note_name]
    scale = _SCALES[mode]
    beat = 60.0 / bpm
    n = int(seconds * rate)
    out = np.zeros((n, 2), dtype=np.float64)

    def midi(degree: int, octave: int) -> float:
        semis = tonic + scale[degree % 7] + 12 * (degree // 7) + 12 * (octave + 1)
        return 440.0 * 2 ** ((semis - 69) / 12)

    def add(start: float, length: float, wave, pan: float) -> None:
        i0 = int(start * rate)
        i1 = min(n, i0 + int(length * rate))
        if i0 >= i1:
            return
        t = np.arange(i1 - i0) / rate
        signal = wave(t)
        out[i0:i1, 0] += signal * (1 - pan) / 2 * 2 ** 0.5
        out[i0:i1, 1] += signal * (1 + pan) / 2 * 2 ** 0.5

    bar = beat * beats
    n_bars = int(np.ceil(seconds / bar))
    progression = _PROGRESSIONS[mode]
    for b in range(n_bars):
        root = progression[b % 4]
        t0 = b * bar
        for k in (0, 2, 4):  # pad triad, left/right slightly detuned for width
            f = midi(root + k, 4)
            for pan, detune in ((-0.6, 0.997), (0.6, 1.003)):
                add(t0, bar, lambda t, f=f * detune: 0.05 * _saw(f, t, 6) * np.minimum(t / 0.15, 1)
                    * np.minimum((bar - t) / 0.05, 1), pan)
        for j in range(beats):  # bass: root on the beat, fifth on the off-beat
            for off, deg in ((0.0, root), (0.5, root + 4)):
                f = midi(deg, 2)
                add(t0 + (j + off) * beat, beat / 2, lambda t, f=f: 0.35 * (np.sin(2 * np.pi * f * t)
                    + 0.3 * np.sin(4 * np.pi * f * t)) * np.exp(-3 * t) * np.minimum(t / 0.005, 1), 0.0)
        for j in range(beats * 2):  # lead: random scale notes on eighths, some rests
            if rng.random() < 0.3:
                continue
            f = midi(int(rng.integers(0, 8)), 5)
            add(t0 + j * beat / 2, beat / 2, lambda t, f=f: 0.18 * _saw(f, t, 5, 0.55) * np.exp(-9 * t), 0.35)
        for j in range(beats):  # kick on the downbeat (and beat 3 in 4/4), hats on every eighth
            if j == 0 or (beats == 4 and j == 2):
                add(t0 + j * beat, 0.3, _kick, 0.0)
            for half in (0.0, 0.5):
                noise = rng.standard_normal(int(0.05 * rate) + 1)
                hat = np.diff(noise)  # first difference: a cheap high-pass, so it sounds like a hat, not a rush
                add(t0 + (j + half) * beat, 0.05, lambda t, h=hat: 0.08 * h[: len(t)] * np.exp(-70 * t), -0.4)

    out /= max(np.abs(out).max(), 1e-9) / 0.8
    return out.astype(np.float32)


def _saw(f: float, t: np.ndarray, harmonics: int, rolloff: float = 1.0) -> np.ndarray:
    """Band-limited saw-like tone: a few harmonics at 1/k (times ``rolloff``^k) so there is no aliasing."""
    return sum(rolloff ** (k - 1) * np.sin(2 * np.pi * k * f * t) / k for k in range(1, harmonics + 1))


def _kick(t: np.ndarray) -> np.ndarray:
    # Pitch sweeps 150 -> 50 Hz; the phase is the integral of that frequency curve.
    phase = 2 * np.pi * (50 * t + (100 / 30) * (1 - np.exp(-30 * t)))
    return 0.7 * np.sin(phase) * np.exp(-8 * t)
