"""A complete feature cache is used without writing to it, so it can live on read-only shared storage.

Tests run as root here, and root ignores file permissions, so ``chmod -R a-w`` alone proves nothing. The test
therefore also watches every write-like operation Python performs under the cache directory (opens for
writing, renames, removals, mkdir, chmod) with an audit hook, and requires there to be none.
"""

from __future__ import annotations

import os
import stat
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from datamodules.cache import build_cache
from datamodules.datamodule import AceStepDataModule
from datamodules.demo import make_demo_dataset
from datamodules.manifest import read_manifest
from datamodules.metadata import load_metadata

_WATCHED: list[tuple[Path, list]] = []  # (directory, writes seen) while a `no_writes_under` block is active
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
_WRITE_EVENTS = {"os.rename", "os.remove", "os.mkdir", "os.rmdir", "os.chmod", "os.chown", "os.utime",
                 "os.truncate", "os.link", "os.symlink", "shutil.rmtree"}


def _audit(event: str, args: tuple) -> None:
    if not _WATCHED:
        return
    if event == "open":
        path, mode, flags = args
        writes = (isinstance(mode, str) and any(c in mode for c in "wax+")) or (
            isinstance(flags, int) and flags & _WRITE_FLAGS)
        paths = [path] if writes else []
    elif event in _WRITE_EVENTS:
        paths = [a for a in args[:2] if isinstance(a, (str, bytes, os.PathLike))]
    else:
        return
    for root, seen in _WATCHED:
        for p in paths:
            p = os.fsdecode(p) if isinstance(p, (str, bytes, os.PathLike)) else None
            if p is not None and os.path.abspath(p).startswith(str(root)):
                seen.append((event, p))


sys.addaudithook(_audit)  # audit hooks cannot be removed; it does nothing outside `no_writes_under`


@contextmanager
def no_writes_under(root: Path) -> Iterator[list]:
    seen: list = []
    _WATCHED.append((root.resolve(), seen))
    try:
        yield seen
    finally:
        _WATCHED.pop()


class TinyEncoder:
    model_hash = "tiny-ro"
    latent_dim = 64

    def __init__(self) -> None:
        self.calls = 0

    def encode(self, audio, records):
        self.calls += 1
        return [{"latents": torch.zeros(round(r.duration * 48000) // 1920, 64), "text_hidden": torch.ones(2, 4),
                 "lyric_embeds": torch.ones(1, 4)} for r in records]


def _snapshot(root: Path) -> dict[str, tuple[int, int, bytes]]:
    return {str(p): (p.stat().st_ino, p.stat().st_mtime_ns, p.read_bytes()) for p in sorted(root.rglob("*"))
            if p.is_file()}


def _chmod_read_only(root: Path) -> None:
    for p in [root, *root.rglob("*")]:
        p.chmod(p.stat().st_mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))


def _restore_write(root: Path) -> None:
    for p in [root, *root.rglob("*")]:
        p.chmod(p.stat().st_mode | stat.S_IWUSR)


def test_the_watcher_sees_writes(tmp_path: Path) -> None:
    """Negative control: the audit hook does catch the writes a rebuild performs."""
    with no_writes_under(tmp_path) as seen:
        (tmp_path / "x").write_text("1")
        os.replace(tmp_path / "x", tmp_path / "y")
    assert {e for e, _ in seen} == {"open", "os.rename"}


@pytest.fixture
def complete_cache(tmp_path: Path) -> tuple[Path, Path]:
    meta = make_demo_dataset(tmp_path / "data", n=3, seconds=1.0, seed=0)
    bad = np.zeros((4800, 2), np.float32)
    bad[7] = np.nan  # a skipped item: its failure marker is part of the complete cache too
    sf.write(tmp_path / "data" / "clip_02.wav", bad, 48000, subtype="FLOAT")
    cache = tmp_path / "cache"
    build_cache(load_metadata(meta), TinyEncoder(), cache, max_duration=None, seed=0, progress=False)
    yield meta, cache
    _restore_write(cache)  # so pytest can clean up


def test_a_complete_cache_is_used_without_any_write(complete_cache: tuple[Path, Path]) -> None:
    meta, cache = complete_cache
    before = _snapshot(cache)
    _chmod_read_only(cache)
    encoder = TinyEncoder()
    with no_writes_under(cache) as seen:
        manifest = build_cache(load_metadata(meta), encoder, cache, max_duration=None, seed=0, progress=False)
        dm = AceStepDataModule(meta, cache, max_duration=None, progress=False)
        dm.connect(encoder)
        dm.setup("fit")
        batch = next(iter(dm.train_dataloader()))
    assert seen == [], seen
    assert encoder.calls == 0 and _snapshot(cache) == before
    data = read_manifest(manifest)
    row = {r.audio.name: r.row for r in load_metadata(meta)}
    assert len(data["entries"]) == 2 and [s["row"] for s in data["skipped"]] == [row["clip_02.wav"]]
    assert dm.manifest_path == manifest and batch.latents.shape[-1] == 64


def test_an_incomplete_cache_still_writes_what_is_missing(complete_cache: tuple[Path, Path]) -> None:
    """The other side: a cache missing an item is rebuilt as before (so the watcher is not vacuous here)."""
    meta, cache = complete_cache
    victim = next((cache / "items").glob("*.safetensors"))
    victim.unlink()
    encoder = TinyEncoder()
    with no_writes_under(cache) as seen:
        build_cache(load_metadata(meta), encoder, cache, max_duration=None, seed=0, progress=False)
    assert encoder.calls == 1 and victim.exists()
    assert any(event == "os.rename" and path == str(victim) for event, path in seen), seen
