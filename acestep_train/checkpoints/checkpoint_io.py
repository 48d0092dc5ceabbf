"""Reading and writing released-layout weight files: (sharded) safetensors and ``silence_latent.pt``.

Every error names the file and what is wrong. No pickle code from a checkpoint is ever executed: tensors come
from safetensors, and the one ``.pt`` file is read with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import json
import math
import pickle
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors.torch import save_file

from acestep_train.checkpoints.atomic import atomic_path, atomic_write

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


_ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
              "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
              "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}


# The safetensors library refuses headers over 100 MB; a longer "header" is a corrupt or hostile file.
MAX_HEADER_BYTES = 100 * 1024 * 1024


def read_safetensors_header(path: Path) -> tuple[dict, int]:
    """The JSON header of a safetensors file and the offset where tensor data starts.

    Every entry is checked against the file before anything is allocated: a known dtype, a shape of
    non-negative integers, data offsets inside the file, and exactly ``prod(shape) * itemsize`` bytes between
    them (Python integers, so a huge shape cannot overflow into a small product). A truncated download or a
    crafted header therefore fails here, naming the file and the key, instead of making the reader allocate
    whatever size the header claims.
    """
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise CheckpointError(f"{path}: not a safetensors file ({size} bytes; truncated?)")
        n = int.from_bytes(raw, "little")
        if n <= 0 or 8 + n > size or n > MAX_HEADER_BYTES:
            raise CheckpointError(f"{path}: corrupt or truncated safetensors header (header length {n}, "
                                  f"file size {size})")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{path}: unreadable safetensors header ({e})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: safetensors header is a {type(header).__name__}, not a JSON object")
    header.pop("__metadata__", None)
    data_bytes = size - 8 - n
    for key, info in header.items():
        _check_entry(path, key, info)
    last = max(header, key=lambda k: header[k]["data_offsets"][1], default=None)
    end = header[last]["data_offsets"][1] if last is not None else 0
    if end > data_bytes:
        raise CheckpointError(f"{path}: truncated: tensors need {8 + n + end} bytes, the file has {size} "
                              f"(tensor {last!r} ends beyond it)")
    return header, 8 + n


def _check_entry(path: Path, key: str, info: object) -> None:
    """One header entry: its dtype, shape and byte span must agree (the caller checks the span fits the file)."""
    if not isinstance(info, dict):
        raise CheckpointError(f"{path}: tensor {key!r}: header entry is not an object")
    dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
    if dtype not in _ST_DTYPES:
        raise CheckpointError(f"{path}: tensor {key!r} has unsupported dtype {dtype!r}")
    if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
        raise CheckpointError(f"{path}: tensor {key!r}: shape {shape!r:.80} is not a list of non-negative integers")
    if (not isinstance(offsets, list) or len(offsets) != 2 or not all(type(o) is int for o in offsets)
            or not 0 <= offsets[0] <= offsets[1]):
        raise CheckpointError(f"{path}: tensor {key!r}: data_offsets {offsets!r:.80} are not [start, end] with "
                              "0 <= start <= end")
    lo, hi = offsets
    need = math.prod(shape) * _ST_DTYPES[dtype].itemsize
    if hi - lo != need:
        raise CheckpointError(f"{path}: tensor {key!r}: {hi - lo} bytes for shape {shape} {dtype} "
                              f"(which needs {need})")


def iter_safetensors(files: list[Path], dtype: torch.dtype | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(key, tensor)`` one at a time, converted to ``dtype`` if given (floating tensors only).

    Each tensor is read with ``readinto`` straight into its own storage (no memory map), so the process holds
    one copy of the weights: the ones the caller keeps, plus at most one tensor in flight during a dtype cast.
    """
    seen: dict[str, Path] = {}
    for path in files:
        header, start = read_safetensors_header(path)
        with open(path, "rb", buffering=0) as f:
            for key, info in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]):
                if key in seen:
                    raise CheckpointError(f"{path}: key {key!r} also appears in {seen[key]}")
                seen[key] = path
                # read_safetensors_header has checked dtype, shape and span, so this allocation is bounded
                # by the file's size.
                t = torch.empty(info["shape"], dtype=_ST_DTYPES[info["dtype"]])
                lo, hi = info["data_offsets"]
                f.seek(start + lo)
                buf = t.view(-1).view(torch.uint8).numpy() if t.numel() else None
                if buf is not None and f.readinto(buf) != hi - lo:
                    raise CheckpointError(f"{path}: tensor {key!r} is cut short; is the file truncated?")
                yield key, (t.to(dtype) if dtype is not None and t.is_floating_point() else t)


def save_safetensors_atomic(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None):
    """Write a safetensors file atomically (``checkpoints.atomic``): readers never see half a file, and the file
    gets the umask's mode (``save_file`` alone creates it 0600)."""
    with atomic_path(path) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp), metadata=metadata)


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
    with atomic_write(path, "wb") as f:
        torch.save(latent_btc.transpose(1, 2).contiguous().cpu(), f)


def read_json(path: Path) -> dict:
    try:
        d = json.loads(Path(path).read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(d, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    return d
