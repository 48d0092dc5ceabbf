"""Preprocessing cache (keys, resume, rank sharding, skip/raise, encoder checks) and the LightningDataModule."""

from __future__ import annotations

import json
import logging
import math
import threading
from dataclasses import replace
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import soundfile as sf
import torch

from datamodules.batch import Batch
from datamodules.cache import Encoder, build_cache
from datamodules.datamodule import AceStepDataModule
from datamodules.dataset import CachedDataset
from datamodules.demo import make_demo_dataset
from datamodules.errors import AudioError, DataError
from datamodules.manifest import manifest_hash, read_manifest
from datamodules.metadata import Record, load_metadata


class ToyEncoder:
    """Deterministic stand-in for the model's encoder (VAE + text encoder).

    latents: each 1920-sample frame pooled into 32 bins per channel, projected by a fixed seeded matrix;
    text/lyrics: one fixed seeded embedding per UTF-8 byte of the caption+metas / language+lyrics.
    """

    def __init__(self, model_hash: str = "toy-v1", width: int = 8, fail_after: int | None = None) -> None:
        g = torch.Generator().manual_seed(0)
        self.proj = torch.randn(64, 64, generator=g)
        self.table = torch.randn(256, width, generator=g)
        self.model_hash = model_hash
        self.fail_after = fail_after
        self.seen: list[Record] = []
        self.lock = threading.Lock()

    def encode(self, audio: torch.Tensor, records: list[Record]) -> list[dict[str, torch.Tensor]]:
        with self.lock:
            if self.fail_after is not None and len(self.seen) >= self.fail_after:
                raise KeyboardInterrupt("simulated interruption")
            self.seen += records
        out = []
        for a, r in zip(audio, records):
            n = round(r.duration * 48000)
            frames = math.ceil(n / 1920)
            x = torch.nn.functional.pad(a[:, :n], (0, frames * 1920 - n))
            pooled = x.reshape(2, frames, 32, 60).mean(-1).permute(1, 0, 2).reshape(frames, 64)
            metas = f"{r.bpm}|{r.timesignature}|{r.keyscale}|{int(r.duration)}"
            out.append({
                "latents": pooled @ self.proj,
                "text_hidden": self._embed(r.prompt + metas),
                "lyric_embeds": self._embed(r.vocal_language + r.lyrics),
            })
        return out

    def _embed(self, text: str) -> torch.Tensor:
        return self.table[torch.tensor(list(text.encode()), dtype=torch.long)]


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_demo_dataset(tmp_path_factory.mktemp("demo"), n=6, seconds=2.0, seed=0)


def _build(records, encoder, cache_dir, **kwargs) -> Path:
    kwargs.setdefault("max_duration", None)
    kwargs.setdefault("seed", 0)
    return build_cache(records, encoder, cache_dir, progress=False, **kwargs)


def _items(cache_dir: Path) -> dict[str, tuple[int, int]]:
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in (cache_dir / "items").glob("*.safetensors")}


def test_encoder_protocol_is_checkable() -> None:
    assert isinstance(ToyEncoder(), Encoder)
    assert not isinstance(object(), Encoder)


def test_build_and_read_back(demo: Path, tmp_path: Path) -> None:
    records = load_metadata(demo)
    encoder = ToyEncoder()
    manifest = _build(records, encoder, tmp_path / "cache")
    data = read_manifest(manifest)
    assert [e["id"] for e in data["entries"]] == [r.id for r in records] and data["skipped"] == []
    assert all(e["n_frames"] == 50 and e["duration"] == 2.0 for e in data["entries"])
    ds = CachedDataset(manifest)
    item = ds[3]
    assert item["id"] == records[3].id and item["latents"].shape == (50, 64)
    assert torch.equal(item["text_hidden"], encoder.encode(torch.zeros(1, 2, 96000), [
        replace(records[3], duration=2.0)])[0]["text_hidden"])
    assert ds.n_frames == [50] * 6 and ds.manifest_hash == manifest_hash(manifest)
    # Rebuilding the same inputs encodes nothing and reproduces the manifest byte for byte.
    again = ToyEncoder()
    assert _build(records, again, tmp_path / "cache") == manifest and again.seen == []
    assert manifest_hash(manifest) == ds.manifest_hash


def test_resume_encodes_only_what_is_missing(demo: Path, tmp_path: Path) -> None:
    records = load_metadata(demo)
    cache = tmp_path / "cache"
    _build(records[:3], ToyEncoder(), cache)
    before = _items(cache)
    assert len(before) == 3
    encoder = ToyEncoder()
    _build(records, encoder, cache)
    assert [r.id for r in encoder.seen] == [r.id for r in records[3:]]
    after = _items(cache)
    assert len(after) == 6 and all(after[name] == stamp for name, stamp in before.items())


def test_interrupted_build_leaves_no_partial_files_and_resumes(demo: Path, tmp_path: Path) -> None:
    records = load_metadata(demo)
    cache = tmp_path / "cache"
    with pytest.raises(KeyboardInterrupt):
        _build(records, ToyEncoder(fail_after=2), cache)
    assert len(_items(cache)) == 2 and not list(cache.glob("manifest-*.json"))
    assert not [p for p in (cache / "items").iterdir() if p.suffix == ".tmp"]
    encoder = ToyEncoder()
    manifest = _build(records, encoder, cache)
    assert len(encoder.seen) == 4 and len(read_manifest(manifest)["entries"]) == 6


def test_two_ranks_share_the_work_exactly_once(demo: Path, tmp_path: Path) -> None:
    records = load_metadata(demo, repeat=2)  # repeats of uncropped files share a cache file
    cache = tmp_path / "cache"
    barrier = threading.Barrier(2, timeout=60)
    encoders = [ToyEncoder(), ToyEncoder()]
    results: dict[int, Path | BaseException] = {}

    def run(rank: int) -> None:
        try:
            results[rank] = _build(records, encoders[rank], cache, rank=rank, world_size=2, barrier=barrier.wait)
        except BaseException as e:  # noqa: BLE001 - re-raised below on the main thread
            results[rank] = e
            barrier.abort()

    threads = [threading.Thread(target=run, args=(r,)) for r in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert isinstance(results[0], Path) and results[0] == results[1], results
    ids = [[r.row for r in e.seen] for e in encoders]
    assert sorted(ids[0] + ids[1]) == sorted({r.row for r in records}) and not set(ids[0]) & set(ids[1])
    assert len(ids[0]) == len(ids[1]) == 3
    entries = read_manifest(results[0])["entries"]
    assert len(entries) == 12 and len({e["file"] for e in entries}) == 6


def test_multi_rank_needs_a_barrier(demo: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="needs a barrier"):
        _build(load_metadata(demo), ToyEncoder(), tmp_path, rank=0, world_size=2)


def test_crops_are_deterministic_per_copy_and_carry_their_duration(demo: Path, tmp_path: Path) -> None:
    records = load_metadata(demo, repeat=2)
    encoder = ToyEncoder()
    manifest = _build(records, encoder, tmp_path / "a", max_duration=1.0, seed=7)
    entries = read_manifest(manifest)["entries"]
    assert all(e["n_frames"] == 25 and e["duration"] == 1.0 for e in entries)
    assert len({e["file"] for e in entries}) == 12  # each copy of a long file gets its own crop
    assert {r.duration for r in encoder.seen} == {1.0}  # the metas see the crop's length, not the song's
    ds = CachedDataset(manifest)
    assert not torch.equal(ds[0]["latents"], ds[6]["latents"])  # row 1, copies 0 and 1
    same = CachedDataset(_build(records, ToyEncoder(), tmp_path / "b", max_duration=1.0, seed=7))
    other = CachedDataset(_build(records, ToyEncoder(), tmp_path / "c", max_duration=1.0, seed=8))
    assert all(torch.equal(ds[i]["latents"], same[i]["latents"]) for i in range(12))
    assert not all(torch.equal(ds[i]["latents"], other[i]["latents"]) for i in range(12))


def test_key_covers_text_and_encoder(demo: Path, tmp_path: Path) -> None:
    records = load_metadata(demo)
    cache = tmp_path / "cache"
    first = _build(records, ToyEncoder(), cache)
    edited = [replace(records[0], prompt="a new caption")] + records[1:]
    encoder = ToyEncoder()
    second = _build(edited, encoder, cache)
    assert [r.prompt for r in encoder.seen] == ["a new caption"]
    assert second != first and manifest_hash(second) != manifest_hash(first)
    encoder = ToyEncoder(model_hash="toy-v2")
    _build(records, encoder, cache)
    assert len(encoder.seen) == 6


def _corrupt_dataset(root: Path) -> Path:
    meta = make_demo_dataset(root, n=3, seconds=1.0, seed=0)
    (root / "clip_01.flac").write_bytes(b"fLaC but not really" * 20)  # header unreadable: fails at planning
    data = np.zeros((48000, 2), dtype=np.float32)
    data[100] = np.nan
    sf.write(root / "clip_02.wav", data, 48000, subtype="FLOAT")  # header fine, samples bad: fails at loading
    return meta


def test_bad_audio_is_skipped_with_file_and_row(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    meta = _corrupt_dataset(tmp_path / "data")
    records = load_metadata(meta)
    with caplog.at_level(logging.WARNING, logger="datamodules"):
        manifest = _build(records, ToyEncoder(), tmp_path / "cache")
    data = read_manifest(manifest)
    # Rows are the CSV lines where each record starts (multi-line lyrics push later rows down).
    row = {r.audio.name: r.row for r in records}
    assert [e["row"] for e in data["entries"]] == [row["clip_00.wav"]]
    assert [(s["row"], s["problem"].split(":")[0]) for s in data["skipped"]] == [
        (row["clip_01.flac"], str(tmp_path / "data" / "clip_01.flac")),
        (row["clip_02.wav"], str(tmp_path / "data" / "clip_02.wav"))]
    messages = [r.getMessage() for r in caplog.records]
    assert any(f"{meta} row {row['clip_01.flac']}: {tmp_path / 'data' / 'clip_01.flac'}: cannot decode audio" in m
               for m in messages)
    assert any(f"{meta} row {row['clip_02.wav']}: {tmp_path / 'data' / 'clip_02.wav'}: 2 of 96000 samples are NaN"
               in m for m in messages)
    with pytest.raises(AudioError, match=rf"{meta} row {row['clip_01.flac']}: .*clip_01\.flac: cannot decode audio"):
        _build(records, ToyEncoder(), tmp_path / "cache2", on_error="raise")
    with pytest.raises(AudioError, match=rf"{meta} row {row['clip_02.wav']}: .*clip_02\.wav: 2 of 96000 samples are NaN"):
        _build(records[:1] + records[2:], ToyEncoder(), tmp_path / "cache3", on_error="raise")


def test_encoder_output_is_checked(demo: Path, tmp_path: Path) -> None:
    records = load_metadata(demo)[:1]

    class NaNEncoder(ToyEncoder):
        def encode(self, audio, records):
            out = super().encode(audio, records)
            out[0]["latents"][3, 5] = float("nan")
            return out

    class PaddedEncoder(ToyEncoder):
        def encode(self, audio, records):
            out = super().encode(audio, records)
            out[0]["latents"] = torch.cat([out[0]["latents"], out[0]["latents"]])
            return out

    with pytest.raises(ValueError, match=rf"{demo} row 2 .*NaN/Inf in latents"):
        _build(records, NaNEncoder(), tmp_path / "a")
    with pytest.raises(ValueError, match=r"row 2 .*100 latent frames for 96000 samples"):
        _build(records, PaddedEncoder(), tmp_path / "b")
    assert not _items(tmp_path / "a") and not _items(tmp_path / "b")


def test_batched_encoding_matches_single(tmp_path: Path) -> None:
    meta = make_demo_dataset(tmp_path / "data", n=4, seconds=1.0, seed=3)
    records = load_metadata(meta)
    # Make lengths differ so the batch needs padding.
    sf.write(tmp_path / "data" / "clip_00.wav", np.full((30000, 2), 0.1, dtype=np.float32), 48000)
    records = load_metadata(meta)
    one = CachedDataset(_build(records, ToyEncoder(), tmp_path / "one"))
    four = CachedDataset(_build(records, ToyEncoder(), tmp_path / "four", batch_size=4))
    for i in range(4):
        assert torch.allclose(one[i]["latents"], four[i]["latents"])
    assert one.n_frames[0] == math.ceil(30000 / 1920)


def test_damaged_cache_file_is_reported(demo: Path, tmp_path: Path) -> None:
    manifest = _build(load_metadata(demo)[:1], ToyEncoder(), tmp_path)
    entry = read_manifest(manifest)["entries"][0]
    (tmp_path / entry["file"]).write_bytes(b"\x10\x00")
    with pytest.raises(DataError, match=rf"{entry['id']}: cannot read cache file .*rebuild the cache"):
        CachedDataset(manifest)[0]
    manifest.write_text(json.dumps({"format": "something else"}))
    with pytest.raises(DataError, match="not a cache manifest"):
        CachedDataset(manifest)


class _Recorder(L.LightningModule):
    """Trains a single scalar on the batch mean; records which items each step saw."""

    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(()))
        self.train_ids: list[list[str]] = []
        self.val_ids: list[str] = []

    def training_step(self, batch: Batch, _):
        assert isinstance(batch, Batch)
        self.train_ids.append(batch.ids)
        masked = batch.latents * batch.latent_mask[..., None]
        return ((masked.mean() - self.w) ** 2)

    def validation_step(self, batch: Batch, _):
        self.val_ids += batch.ids

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_datamodule_trains_two_epochs_with_a_row_split(demo: Path, tmp_path: Path) -> None:
    dm = AceStepDataModule(demo, tmp_path / "cache", repeat=2, batch_size=2, val_fraction=0.34, seed=0,
                           max_duration=None, progress=False)
    with pytest.raises(RuntimeError, match="connect"):
        dm.setup("fit")
    with pytest.raises(TypeError, match="needs an Encoder"):
        dm.connect(object())
    dm.connect(ToyEncoder())
    module = _Recorder()
    trainer = L.Trainer(max_epochs=2, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
                        num_sanity_val_steps=0)
    trainer.fit(module, datamodule=dm)
    assert len(dm.manifest_hash) == 64
    val_ids = set(module.val_ids)
    assert len(val_ids) == 2 and len(module.val_ids) == 4  # 2 rows x 2 epochs, no repeat copies
    epochs = [sum(module.train_ids[:4], []), sum(module.train_ids[4:], [])]
    assert len(module.train_ids) == 8
    for ids in epochs:  # 4 train rows x 2 copies, each exactly once, none from validation
        assert sorted(ids) == sorted(2 * sorted({i for i in ids})) and len(set(ids)) == 4
        assert not set(ids) & val_ids
    assert module.train_ids[:4] != module.train_ids[4:]  # set_epoch reached the sampler
