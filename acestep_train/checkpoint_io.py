"""Reading and writing released-layout weight files: (sharded) safetensors and ``silence_latent.pt``.

Every error names the file and what is wrong. No pickle code from a checkpoint is ever executed: tensors come
from safetensors, and the one ``.pt`` file is read with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import json
import os
import pickle
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

SILENCE_LATENT_FILE = "silence_latent.pt"


class CheckpointError(RuntimeError):
    """A checkpoint file or folder is missing, unreadable or does not match the model."""


def weight_files(folder: Path) -> list[Path]:
    """The DiT weight files of a released variant folder: ``model.safetensors`` or ``model-*.safetensors``."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: checkpoint folder does not exist")
    single = folder / "model.safetensors"
    shards = sorted(folder.glob("model-*.safetensors"))
    if single.is_file():
        return [single]
    if shards:
        return shards
    present = sorted(p.name for p in folder.iterdir())[:10]
    raise CheckpointError(f"{folder}: no model.safetensors or model-*.safetensors shards (folder holds {present})")


def iter_safetensors(files: list[Path], dtype: torch.dtype | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(key, tensor)`` one at a time, converted to ``dtype`` if given, so at most one extra tensor
    is alive beyond what the caller keeps."""
    seen: dict[str, Path] = {}
    for path in files:
        try:
            f = safe_open(str(path), framework="pt", device="cpu")
            keys = list(f.keys())
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"{path}: cannot read safetensors file ({e}); is it truncated or corrupt?") from None
        for key in keys:
            if key in seen:
                raise CheckpointError(f"{path}: key {key!r} also appears in {seen[key]}")
            seen[key] = path
            try:
                t = f.get_tensor(key)
            except (SafetensorError, OSError, RuntimeError) as e:
                raise CheckpointError(f"{path}: cannot read tensor {key!r} ({e}); is the file truncated?") from None
            yield key, (t.to(dtype) if dtype is not None and t.is_floating_point() else t)


def save_safetensors_atomic(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None):
    """Write a safetensors file via a temporary name and ``os.replace`` so readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp), metadata=metadata)
    os.replace(tmp, path)


def load_silence_latent(path: Path) -> torch.Tensor:
    """``silence_latent.pt`` stored ``[1, C, T]`` -> ``[1, T, C]`` float32."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: silence latent file does not exist")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(
            f"{path}: not a plain tensor file that can be loaded safely with weights_only=True ({first})") from None
    if not isinstance(obj, torch.Tensor):
        raise CheckpointError(f"{path}: expected a tensor [1, C, T], found a {type(obj).__name__}")
    if obj.dim() != 3 or obj.shape[0] != 1:
        raise CheckpointError(f"{path}: expected a tensor of shape [1, C, T], found {list(obj.shape)}")
    return obj.transpose(1, 2).contiguous().float()


def save_silence_latent(latent_btc: torch.Tensor, path: Path) -> None:
    """Inverse of :func:`load_silence_latent`: store ``[1, T, C]`` as ``[1, C, T]``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(latent_btc.transpose(1, 2).contiguous().cpu(), tmp)
    os.replace(tmp, path)


def read_json(path: Path) -> dict:
    try:
        d = json.loads(Path(path).read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(d, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    return d
