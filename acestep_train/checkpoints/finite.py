"""Refuse weight files with NaN/Inf values where they are loaded, naming the file and the tensor.

A NaN adapter otherwise surfaces far from its cause: as silent NaN audio from ``generate``, or, as a training
start point, as a non-finite loss that points at the data samples of the first batch.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path

import torch

from acestep_train.checkpoints.checkpoint_io import CheckpointError

_TENSOR_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


def first_non_finite(named: Iterable[tuple[str, torch.Tensor]]) -> tuple[str, int, int] | None:
    """``(key, non-finite count, numel)`` of the first floating tensor holding NaN/Inf, or None."""
    for key, t in named:
        if t.is_floating_point() and t.numel():
            bad = int((~torch.isfinite(t)).sum())
            if bad:
                return key, bad, t.numel()
    return None


def _tensors_of(path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor of a weight file (or of the weight files in a folder, e.g. a PEFT adapter), one at a time."""
    files = sorted(p for p in path.iterdir() if p.suffix in _TENSOR_SUFFIXES) if path.is_dir() else [path]
    for file in files:
        if file.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(file), framework="pt") as f:
                for key in f.keys():
                    yield f"{file}: {key}", f.get_tensor(key)
        else:
            state = torch.load(file, map_location="cpu", weights_only=True)
            for key, value in (state.items() if isinstance(state, dict) else ()):
                if isinstance(value, torch.Tensor):
                    yield f"{file}: {key}", value


def check_finite_weights(path: str | Path, what: str = "adapter") -> None:
    """Raise :class:`CheckpointError` naming the file and key if any tensor of ``path`` is NaN/Inf.

    Unreadable files pass through untouched: the loader that follows reports those in its own words.
    """
    path = Path(path)
    if not path.exists():
        return
    try:
        found = first_non_finite(_tensors_of(path))
    except CheckpointError:
        raise
    except Exception:  # not a weight file this check can read: leave the message to the real loader
        return
    if found:
        key, bad, n = found
        raise CheckpointError(f"{what} {key}: {bad} of {n} values are NaN/Inf; the file is corrupt or was saved "
                              "from a diverged run, so it cannot be used")


def check_finite_lora(lora_file) -> None:
    """:func:`check_finite_weights` for an adapter already read (``acestep_train.lora.LoraFile``): names the file
    and the module."""
    named = ((f"{module}.{part}", t) for module, delta in lora_file.weights.items()
             for part, t in (("lora_A", delta.A), ("lora_B", delta.B)))
    found = first_non_finite(named)
    if found:
        key, bad, n = found
        raise CheckpointError(f"adapter {lora_file.path}: {key}: {bad} of {n} values are NaN/Inf; the file is corrupt "
                              "or was saved from a diverged run, so it cannot be used")
