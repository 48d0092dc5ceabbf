"""Atomic Lightning checkpoints: a crash or preemption mid-write never leaves a truncated ``.ckpt``.

The checkpoint is serialised straight into a temporary file next to the target (then fsynced and renamed over it):
no second copy of it is built in memory first, which at full fine-tuning size is gigabytes of host memory on top of
the model, the gradients and the optimizer state. Before writing, the checkpoint is checked to hold only plain data
(what ``torch.load(weights_only=True)`` accepts), so a checkpoint that resume or export would refuse to load fails
here, at the first save, naming the key.
"""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from acestep_train.checkpoints.atomic import atomic_write

# What the weights_only unpickler rebuilds (plus tensors and the torch value types it allows).
_PLAIN_SCALARS = (str, bytes, int, float, bool, complex, type(None), torch.dtype, torch.device, torch.Size)


class NotPlainDataError(TypeError):
    """A checkpoint value that ``torch.load(weights_only=True)`` would refuse."""


def non_plain_values(obj: Any, key: str = "checkpoint", limit: int = 5) -> list[str]:
    """``["<key path>: <type>", ...]`` for values that a ``weights_only=True`` load would refuse (first ``limit``)."""
    found: list[str] = []
    stack = [(key, obj)]
    while stack and len(found) < limit:
        where, value = stack.pop()
        if isinstance(value, torch.Tensor) or type(value) in _PLAIN_SCALARS:
            continue
        if type(value) in (dict, OrderedDict):
            stack.extend((f"{where}.{k}", v) for k, v in value.items())
        elif type(value) in (list, tuple, set):
            stack.extend((f"{where}[{i}]", v) for i, v in enumerate(value))
        else:
            found.append(f"{where}: {type(value).__module__}.{type(value).__qualname__}")
    return found


def check_plain(checkpoint: dict[str, Any], path: Path) -> None:
    bad = non_plain_values(checkpoint)
    if bad:
        raise NotPlainDataError(
            f"{path}: the checkpoint holds values that resume and export (torch.load(weights_only=True)) cannot "
            f"load: {'; '.join(bad)}; convert them to plain dicts/lists/numbers/strings before they reach a module "
            "or data module (e.g. OmegaConf.to_container)")


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes the checkpoint to a temporary file in the target's folder and renames it over the target."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError("AtomicCheckpointIO takes no storage_options")
        path = Path(path)
        check_plain(checkpoint, path)
        with atomic_write(path, "wb") as f:
            torch.save(checkpoint, f)
