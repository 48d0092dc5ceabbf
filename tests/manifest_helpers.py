"""The reference key manifests (``shared/reference/checkpoints``) and DiffSynth's checkpoint fingerprint."""

import hashlib
import json
import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def reference_dir() -> Path:
    """``shared/reference`` beside the repository (CI clones with shared/ next to it)."""
    return Path(os.environ.get("ACESTEP_REFERENCE_DIR", REPO.parent / "shared" / "reference"))


def load_manifest(name: str) -> dict:
    path = reference_dir() / "checkpoints" / name
    if not path.is_file():
        pytest.skip(f"reference manifest {path} not found (set ACESTEP_REFERENCE_DIR to the reference folder)")
    return json.loads(path.read_text())


def ds_hash(keys_to_shape: dict) -> str:
    """DiffSynth's checkpoint fingerprint (recipe in checkpoints/README.md), to prove a manifest is the real one."""
    parts = []
    for k, shape in keys_to_shape.items():
        parts += [k + ":" + "_".join(map(str, shape)), k]
    return hashlib.md5(",".join(sorted(parts)).encode("utf-8")).hexdigest()
