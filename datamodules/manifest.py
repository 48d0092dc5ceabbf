"""The cache manifest: which cached item files make up a dataset, and a hash that identifies it.

A manifest is a JSON file next to the cached items (``<cache_dir>/manifest-<plan digest>.json``). Its name is
derived from the build inputs, so several datasets or settings can share one cache directory (and reuse each
other's items) without overwriting each other's manifest. ``manifest_hash`` (sha256 of the file) changes
whenever any item's audio bytes, text fields, crop, encoder or preprocessing version change, so it is what a
run records to say which data it trained on.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from datamodules.errors import DataError

PREPROCESS_VERSION = "2"  # bump when loading/cropping/keying changes what a cached item contains
# 2: over-full-scale float audio is normalised instead of clipped; crops are planned on the exact 48 kHz length
MANIFEST_FORMAT = "acestep-train cache manifest"
TENSOR_KEYS = ("latents", "text_hidden", "lyric_embeds")  # what every cached item file holds


def write_json_atomic(path: Path, data: Any) -> None:
    """Write JSON so readers see the old file or the new one, never half of one (write tmp, fsync, replace)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with tmp.open("w", encoding="utf-8") as f:
            f.write(_dumps(data))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_json_if_changed(path: Path, data: Any) -> bool:
    """``write_json_atomic`` unless the file already holds exactly this; returns whether it wrote.

    Skipping the identical write is what lets a complete cache be used from read-only storage.
    """
    text = _dumps(data)
    try:
        if path.read_text(encoding="utf-8") == text:
            return False
    except (OSError, UnicodeDecodeError):
        pass
    write_json_atomic(path, data)
    return True


def _dumps(data: Any) -> str:
    return json.dumps(data, indent=1, sort_keys=True)


def read_manifest(path: str | Path) -> dict[str, Any]:
    """Load and sanity-check a manifest written by ``build_cache``."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: cache manifest not found (run build_cache / the datamodule's setup first)")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: cache manifest is not valid JSON ({e})") from e
    if not isinstance(data, dict) or data.get("format") != MANIFEST_FORMAT:
        raise DataError(f"{path}: not a cache manifest (missing format marker {MANIFEST_FORMAT!r})")
    if data.get("preprocess_version") != PREPROCESS_VERSION:
        raise DataError(
            f"{path}: built by preprocess version {data.get('preprocess_version')!r}, this code is "
            f"{PREPROCESS_VERSION!r}; rebuild the cache"
        )
    return data


def manifest_hash(path: str | Path) -> str:
    """sha256 of the manifest file: the identity of the training data for run tracking."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()
