"""The key manifests of the released files (shipped in ``acestep_train/checkpoints/manifests``) and DiffSynth's
checkpoint fingerprint."""

import hashlib
import json

from acestep_train.checkpoints import MANIFEST_DIR


def load_manifest(name: str) -> dict:
    return json.loads((MANIFEST_DIR / name).read_text())


def ds_hash(keys_to_shape: dict) -> str:
    """DiffSynth's checkpoint fingerprint (recipe in acestep_train/checkpoints/manifests/README.md), to prove a manifest is the real one."""
    parts = []
    for k, shape in keys_to_shape.items():
        parts += [k + ":" + "_".join(map(str, shape)), k]
    return hashlib.md5(",".join(sorted(parts)).encode("utf-8")).hexdigest()
