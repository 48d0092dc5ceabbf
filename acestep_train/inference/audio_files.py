"""Writing generated audio: wav/flac files, mel-spectrogram pictures and JSON sidecars.

Shared by ``generate`` and the validation-audio callback so both produce the same artefacts.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf
import torch

FORMATS = {".wav": ("WAV", "FLOAT"), ".flac": ("FLAC", "PCM_24")}


def write_audio(path: str | Path, audio: torch.Tensor, sample_rate: int = 48000) -> Path:
    """Write ``[channels, samples]`` float audio as wav (32-bit float) or flac (24-bit), atomically."""
    path = Path(path)
    if path.suffix.lower() not in FORMATS:
        raise ValueError(f"{path}: unsupported audio format {path.suffix!r}; use one of {sorted(FORMATS)}")
    if audio.dim() != 2:
        raise ValueError(f"{path}: expected audio [channels, samples], got shape {list(audio.shape)}")
    fmt, subtype = FORMATS[path.suffix.lower()]
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp{path.suffix}")
    data = audio.detach().float().cpu().clamp(-1, 1).T.numpy()
    sf.write(str(tmp), data, sample_rate, format=fmt, subtype=subtype)
    os.replace(tmp, path)
    return path


def mel_spectrogram_db(audio: torch.Tensor, sample_rate: int = 48000, n_mels: int = 128) -> np.ndarray:
    """Log-mel spectrogram (dB, ``[n_mels, frames]``) of the channel mean."""
    import torchaudio

    mono = audio.detach().float().cpu().mean(0)
    mel = torchaudio.transforms.MelSpectrogram(sample_rate=sample_rate, n_fft=2048, hop_length=512, n_mels=n_mels,
                                               f_max=sample_rate / 2)(mono)
    return torchaudio.functional.amplitude_to_DB(mel, 10.0, 1e-10, 0.0, top_db=80.0).numpy()


def save_spectrogram_png(path: str | Path, audio: torch.Tensor, sample_rate: int = 48000,
                         title: str | None = None) -> Path:
    """A mel-spectrogram picture next to the audio, so a run can be skimmed without listening."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    db = mel_spectrogram_db(audio, sample_rate)
    seconds = audio.shape[-1] / sample_rate
    fig, ax = plt.subplots(figsize=(8, 3), dpi=100)
    im = ax.imshow(db, origin="lower", aspect="auto", extent=(0, seconds, 0, db.shape[0]), cmap="magma")
    ax.set_xlabel("seconds")
    ax.set_ylabel("mel bin")
    if title:
        ax.set_title(title[:90], fontsize=9)
    fig.colorbar(im, ax=ax, format="%+.0f dB")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def png_as_array(path: str | Path) -> np.ndarray:
    """``[H, W, 3]`` uint8 pixels of a PNG (for TensorBoard's ``add_image``)."""
    import matplotlib.image as mpimg

    img = mpimg.imread(str(path))
    if img.dtype != np.uint8:
        img = (img[..., :3] * 255).round().astype(np.uint8)
    return img[..., :3]


def write_sidecar(path: str | Path, data: dict[str, Any]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, default=str, ensure_ascii=False) + "\n")
    return path
