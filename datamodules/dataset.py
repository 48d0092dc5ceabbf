"""Read cached items back for training, as listed by a cache manifest."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch.utils.data import Dataset

from datamodules.errors import DataError
from datamodules.manifest import TENSOR_KEYS, manifest_hash, read_manifest


class CachedDataset(Dataset):
    """Items of a cache manifest: ``{"latents" [T, 64], "text_hidden" [Lt, E], "lyric_embeds" [Ll, E], "id"}``.

    Lengths come from the manifest (no file reads), so samplers can bucket by ``n_frames`` cheaply; masks are
    implied by these lengths and built by ``collate``.

    Args:
        manifest: path written by ``build_cache``.
        indices: positions in the manifest's entry list to serve (a train/val split); default all.
    """

    def __init__(self, manifest: str | Path, indices: Sequence[int] | None = None) -> None:
        self.manifest = Path(manifest)
        data = read_manifest(self.manifest)
        self.manifest_hash = manifest_hash(self.manifest)
        all_entries = data["entries"]
        if indices is None:
            indices = range(len(all_entries))
        bad = [i for i in indices if not 0 <= i < len(all_entries)]
        if bad:
            raise IndexError(f"{self.manifest}: indices {bad[:5]} outside its {len(all_entries)} entries")
        self.entries = [all_entries[i] for i in indices]
        self.root = self.manifest.parent

    def __len__(self) -> int:
        return len(self.entries)

    @property
    def n_frames(self) -> list[int]:
        return [e["n_frames"] for e in self.entries]

    @property
    def ids(self) -> list[str]:
        return [e["id"] for e in self.entries]

    def __getitem__(self, index: int) -> dict[str, torch.Tensor | str]:
        entry = self.entries[index]
        path = self.root / entry["file"]
        try:
            tensors = load_file(str(path))
        except (OSError, SafetensorError) as e:
            raise DataError(f"{entry['id']}: cannot read cache file {path} ({e}); rebuild the cache") from e
        missing = [k for k in TENSOR_KEYS if k not in tensors]
        if missing or tensors["latents"].shape[0] != entry["n_frames"]:
            raise DataError(f"{entry['id']}: cache file {path} does not match the manifest "
                            f"(missing {missing}, n_frames {entry['n_frames']}); rebuild the cache")
        return {k: tensors[k] for k in TENSOR_KEYS} | {"id": entry["id"]}
