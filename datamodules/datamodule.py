"""LightningDataModule: metadata -> cache (built once, by all ranks) -> length-bucketed padded ``Batch``es.

The encoder comes from the model side through ``connect(encoder)`` (this package never imports the model).

    dm = AceStepDataModule("data/metadata.csv", cache_dir="cache/", batch_size=2)
    dm.connect(encoder)          # an object satisfying datamodules.cache.Encoder
    trainer.fit(module, datamodule=dm)   # Trainer(use_distributed_sampler=False) for multi-GPU
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
from torch.utils.data import DataLoader

from datamodules.cache import Encoder, build_cache
from datamodules.collate import collate
from datamodules.dataset import CachedDataset
from datamodules.errors import check_on_error
from datamodules.metadata import load_metadata
from datamodules.sampler import BucketBatchSampler


class AceStepDataModule(L.LightningDataModule):
    """Serve ``Batch``es from a metadata file through the preprocessing cache.

    Args:
        metadata: CSV / JSON / JSONL metadata file (see ``datamodules.metadata``).
        base_path: directory relative audio paths resolve against; default: the metadata file's directory.
        cache_dir: where cached items and manifests live (shared by all ranks and nodes).
        repeat: each row appears this many times per epoch (long files get a different crop per copy).
        max_duration: seconds; longer files are randomly cropped to this (None: never crop).
        batch_size: items per batch on each rank.
        num_workers: DataLoader worker processes.
        pool_batches: global batches sorted together by length (see ``BucketBatchSampler``).
        drop_last: drop each epoch's final smaller batch.
        on_error: ``"skip"`` bad rows/files with a warning each and a summary, or ``"raise"`` on the first.
        fields: ``{field: column}`` for metadata columns not named like ours.
        seed: crop, shuffle and split seed.
        val_fraction: fraction of metadata rows held out for validation (None: no validation). The split is
            by row, so no repeat copy of a validation row is trained on.
        encode_batch_size: items per ``encoder.encode`` call while building the cache.
        progress: show a progress bar while building the cache.
        demo: ``{n, seconds, seed}``: first generate the demo dataset (``datamodules.demo``) so that ``metadata``
            exists (rank 0 writes it, the others wait). For the embedded default run and tutorials.
    """

    def __init__(
        self,
        metadata: str | Path,
        cache_dir: str | Path,
        *,
        base_path: str | Path | None = None,
        repeat: int = 1,
        max_duration: float | None = 240.0,
        batch_size: int = 1,
        num_workers: int = 0,
        pool_batches: int = 50,
        drop_last: bool = False,
        on_error: str = "skip",
        fields: Mapping[str, str] | None = None,
        seed: int = 0,
        val_fraction: float | None = None,
        encode_batch_size: int = 1,
        progress: bool = True,
        demo: Mapping[str, Any] | None = None,
        shuffle: bool = True,
    ) -> None:
        super().__init__()
        check_on_error(on_error)
        if val_fraction is not None and not 0.0 < val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in (0, 1) or None, got {val_fraction}")
        self.save_hyperparameters()
        self.metadata = Path(metadata)
        self.cache_dir = Path(cache_dir)
        self.base_path = base_path
        self.repeat = repeat
        self.max_duration = max_duration
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.pool_batches = pool_batches
        self.drop_last = drop_last
        self.on_error = on_error
        self.fields = dict(fields) if fields is not None else None
        self.seed = seed
        self.val_fraction = val_fraction
        self.encode_batch_size = encode_batch_size
        self.progress = progress
        self.demo = dict(demo) if demo else None
        self.shuffle = shuffle
        self._train_sampler: BucketBatchSampler | None = None
        self._resume_state: dict[str, int] | None = None
        self.encoder: Encoder | None = None
        self.train_dataset: CachedDataset | None = None
        self.val_dataset: CachedDataset | None = None
        self.manifest_path: Path | None = None

    def connect(self, encoder: Encoder) -> None:
        """Receive the model side's encoder (late-bound: it exists only once the model is built)."""
        if not isinstance(encoder, Encoder):
            raise TypeError(f"connect() needs an Encoder (model_hash + encode), got {type(encoder).__name__}")
        self.encoder = encoder

    def prepare_data(self) -> None:
        # Nothing to download. Building the cache here would run on one process per node only; setup() runs
        # on every rank, so all GPUs share the encoding work.
        pass

    def setup(self, stage: str | None = None) -> None:
        if self.train_dataset is not None:  # Lightning calls setup once per stage (fit, validate, ...)
            return
        if self.encoder is None:
            raise RuntimeError("AceStepDataModule.setup: call connect(encoder) first")
        rank, world_size, barrier = self._distributed()
        if self.demo:
            self._make_demo(rank, world_size, barrier)
        with _quiet(rank != 0):  # every rank validates the metadata; one copy of each warning is enough
            records = load_metadata(self.metadata, base_path=self.base_path, fields=self.fields,
                                    repeat=self.repeat, on_error=self.on_error)
        self.manifest_path = build_cache(
            records, self.encoder, self.cache_dir, max_duration=self.max_duration, seed=self.seed,
            batch_size=self.encode_batch_size, progress=self.progress and rank == 0, rank=rank,
            world_size=world_size, on_error=self.on_error, barrier=barrier,
        )
        everything = CachedDataset(self.manifest_path)
        train, val = self._split(everything.entries)
        self.train_dataset = CachedDataset(self.manifest_path, train)
        self.val_dataset = CachedDataset(self.manifest_path, val) if val else None

    @property
    def manifest_hash(self) -> str:
        """sha256 of the cache manifest: identifies the exact training data (log it with the run)."""
        if self.train_dataset is None:
            raise RuntimeError("manifest_hash is known after setup()")
        return self.train_dataset.manifest_hash

    def train_dataloader(self) -> DataLoader:
        loader = self._loader(self._require(self.train_dataset), shuffle=self.shuffle, drop_last=self.drop_last)
        self._train_sampler = loader.batch_sampler
        if self._resume_state is not None:
            # Lightning builds the loader (and its first iterator) before the loops are restored, so the position
            # is applied here, from the state restored into the data module.
            epoch, done = self._resume_state["epoch"], self._resume_state["batches_done"]
            if done >= len(loader.batch_sampler):  # saved at the end of an epoch: continue with the next one
                epoch, done = epoch + 1, 0
            loader.batch_sampler.set_epoch(epoch)
            loader.batch_sampler.resume(epoch, done)
            self._resume_state = None
        return loader

    # ---- exact resume: saved into / restored from Lightning checkpoints --------------------------------------
    def state_dict(self) -> dict[str, int]:
        """Where training is in the data: (epoch, batches of it already trained)."""
        if self.trainer is None or self._train_sampler is None:
            return {}
        done = int(self.trainer.fit_loop.epoch_loop.batch_progress.current.processed)
        return {"epoch": int(self._train_sampler.epoch), "batches_done": done}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self._resume_state = dict(state) if state else None

    def val_dataloader(self) -> DataLoader | list:
        if self.val_dataset is None:
            return []  # Lightning skips validation for an empty list
        return self._loader(self.val_dataset, shuffle=False, drop_last=False)

    def _loader(self, dataset: CachedDataset, *, shuffle: bool, drop_last: bool) -> DataLoader:
        rank, world_size, _ = self._distributed()
        sampler = BucketBatchSampler(
            dataset.n_frames, self.batch_size, shuffle=shuffle, seed=self.seed, rank=rank,
            world_size=world_size, drop_last=drop_last, pool_batches=self.pool_batches,
        )
        return DataLoader(dataset, batch_sampler=sampler, collate_fn=collate, num_workers=self.num_workers,
                          persistent_workers=self.num_workers > 0)

    def _make_demo(self, rank: int, world_size: int, barrier) -> None:
        from datamodules.demo import make_demo_dataset

        if rank == 0 and not self.metadata.is_file():
            made = make_demo_dataset(self.metadata.parent, **self.demo)
            if made != self.metadata:
                raise ValueError(f"the demo dataset's metadata is {made}, but metadata= points at {self.metadata}")
        if world_size > 1:
            barrier()

    def _split(self, entries: list[dict]) -> tuple[list[int], list[int]]:
        if self.val_fraction is None:
            return list(range(len(entries))), []
        rows = sorted({e["row"] for e in entries})
        n_val = max(1, round(self.val_fraction * len(rows)))
        if n_val >= len(rows):
            raise ValueError(f"val_fraction={self.val_fraction} of {len(rows)} usable rows leaves nothing to train on")
        val_rows = set(np.random.default_rng(self.seed).permutation(rows)[:n_val].tolist())
        train = [i for i, e in enumerate(entries) if e["row"] not in val_rows]
        val = [i for i, e in enumerate(entries) if e["row"] in val_rows and e["repeat"] == 0]
        return train, val

    def _distributed(self):
        trainer = self.trainer  # None when used without a Trainer (tests, scripts)
        if trainer is None or trainer.world_size == 1:
            return 0, 1, None
        return trainer.global_rank, trainer.world_size, trainer.strategy.barrier

    @staticmethod
    def _require(dataset: CachedDataset | None) -> CachedDataset:
        if dataset is None:
            raise RuntimeError("call setup() before asking for dataloaders")
        return dataset


@contextlib.contextmanager
def _quiet(enabled: bool) -> Iterator[None]:
    logger = logging.getLogger("datamodules")
    old = logger.level
    if enabled:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(old)
