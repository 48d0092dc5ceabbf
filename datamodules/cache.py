"""The preprocessing cache: encode every (cropped) audio file and its text once, then train from the files.

One safetensors file per item under ``<cache_dir>/items/``, named by a key that covers everything the item's
content depends on: sha256 of the audio file's bytes, the encoder's ``model_hash``, ``PREPROCESS_VERSION``, the
crop (when the file is longer than ``max_duration``) and the record's text fields. Consequences:
  - an interrupted build resumes: present files are skipped, and a file is either complete or absent
    (written to a temporary name, fsynced, then ``os.replace``d);
  - changing a caption, the audio, the encoder or the crop settings re-encodes only what changed;
  - identical rows (``repeat`` copies of a file that needs no crop) share one file;
  - a complete cache is used without writing anything (the manifest and failure markers are only rewritten
    when their content changes), so a finished cache can be shared from read-only storage.

Only each item's crop window is decoded (planned from the file header, see ``datamodules.audio``). Per-file
problems are reported once per metadata row, naming the row and the file: unusable audio (empty, shorter than
one latent frame, undecodable, NaN/Inf) is skipped and listed under the manifest's ``skipped``; usable audio
with a problem (truncated, over full scale, silent) is kept and listed under ``warnings``.

Sharding: the distinct items are dealt out ``j % world_size == rank``, so ranks never write the same file.
Rank 0 writes the manifest after a barrier, once every rank's items are on disk.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from datamodules.audio import (
    HOP, SAMPLE_RATE, AudioInfo, check_encodable, crop_window, inspect_audio, read_window, resampled_length,
)
from datamodules.errors import AudioError, DataError, Problems, log
from datamodules.manifest import MANIFEST_FORMAT, PREPROCESS_VERSION, TENSOR_KEYS, write_json_if_changed
from datamodules.metadata import Record

LATENT_DIM = 64  # the released VAE; an encoder may declare another ``latent_dim`` (the tiny model uses 8)
_TEXT_FIELDS = ("prompt", "lyrics", "bpm", "keyscale", "timesignature", "vocal_language")
_NO_LYRICS = ("", "[instrumental]", "[inst]")


@runtime_checkable
class Encoder(Protocol):
    """What the cache needs from the model side (implemented there; data never imports the model).

    ``model_hash`` identifies everything that changes the encoder's output (VAE and text-encoder weights,
    prompt templates, dtype); it should be cheap, since it is read even when the cache is complete and
    ``encode`` is never called.

    ``encode`` gets ``audio [B, 2, N]`` (48 kHz, in [-1, 1]) where items shorter than the longest are
    zero-padded at the end; ``records[i].duration`` is item i's true length in seconds (``round(duration *
    48000)`` valid samples, already cropped). It returns one dict per item with ``latents [T, 64]`` (T ~
    valid samples / 1920, padding removed), ``text_hidden [Lt, E]`` and ``lyric_embeds [Ll, E]``.
    """

    model_hash: str

    def encode(self, audio: torch.Tensor, records: list[Record]) -> list[dict[str, torch.Tensor]]: ...


@dataclass(frozen=True)
class _Planned:
    record: Record
    key: str
    audio_sha: str
    info: AudioInfo  # the file's header facts: the crop is planned from these, only the window is decoded
    cropped: bool

    @property
    def seconds(self) -> float:  # whole file
        return self.info.seconds

    @property
    def file(self) -> str:
        return f"items/{self.key}.safetensors"


def build_cache(
    records: Sequence[Record],
    encoder: Encoder,
    cache_dir: str | Path,
    *,
    max_duration: float | None,
    seed: int,
    batch_size: int = 1,
    progress: bool = True,
    rank: int = 0,
    world_size: int = 1,
    on_error: str = "skip",
    barrier: Callable[[], None] | None = None,
) -> Path:
    """Encode the records that are not cached yet and write the manifest.

    Args:
        records: from ``load_metadata`` (repeats included).
        encoder: the model side's ``Encoder``.
        cache_dir: shared by all ranks (on multi-node runs it must be a shared filesystem).
        max_duration: files longer than this many seconds get a random crop of this length (None: no crop).
        seed: crop seed; together with the file hash and the repeat copy it fixes the crop, so every rank and
            every rerun picks the same one.
        batch_size: items per ``encoder.encode`` call.
        progress: show a tqdm bar.
        rank, world_size: this process's share of the work (``j % world_size == rank`` over distinct items).
        on_error: what to do with unreadable audio: ``"skip"`` (warn, leave it out, list it in the manifest)
            or ``"raise"``.
        barrier: waits for all ranks; required when ``world_size > 1`` (e.g. ``trainer.strategy.barrier``).

    Returns:
        Path of the manifest (the same on every rank).
    """
    if world_size > 1 and barrier is None:
        raise ValueError("build_cache with world_size > 1 needs a barrier so rank 0 writes the manifest last")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if not records:
        raise DataError("build_cache: no records to cache")
    model_hash = encoder.model_hash
    if not isinstance(model_hash, str) or not model_hash:
        raise TypeError(f"encoder.model_hash must be a non-empty string, got {model_hash!r}")
    cache_dir = Path(cache_dir)
    if not (cache_dir / "items").is_dir():  # a complete cache may be read-only: create nothing that exists
        (cache_dir / "items").mkdir(parents=True, exist_ok=True)
    # Planning is identical on every rank; only rank 0 logs its warnings so they appear once.
    plan_problems = Problems("cache plan", on_error, AudioError, verbose=rank == 0)
    planned, plan_skipped = _plan(records, model_hash, max_duration, seed, plan_problems)
    distinct: dict[str, _Planned] = {}
    for p in planned:  # repeat copies that need no crop share a key: encode the first one only
        distinct.setdefault(p.key, p)
    mine = [p for j, p in enumerate(distinct.values()) if j % world_size == rank]
    todo = [p for p in mine if not (cache_dir / p.file).exists()]
    log.info("cache %s: %d distinct items, rank %d/%d encodes %d (%d already cached)",
             cache_dir, len(distinct), rank, world_size, len(todo), len(mine) - len(todo))
    if rank == 0:
        _warn_about_crops(planned, max_duration)

    problems = Problems(f"cache build (rank {rank})", on_error, AudioError)
    _encode_all(todo, encoder, cache_dir, max_duration, seed, batch_size, progress, rank, problems)

    if world_size > 1:
        barrier()
    manifest = cache_dir / f"manifest-{_plan_digest(planned, plan_skipped, model_hash, max_duration, seed)}.json"
    if rank == 0:
        _write_manifest(manifest, planned, plan_skipped, model_hash, max_duration, seed)
    if world_size > 1:
        barrier()
    return manifest


def _plan(
    records: Sequence[Record], model_hash: str, max_duration: float | None, seed: int, problems: Problems
) -> tuple[list[_Planned], list[tuple[Record, str]]]:
    """Key every record. Reads each file's bytes (hash) and header (length) but decodes nothing.

    A file's problems are reported once per metadata row (repeat copies share the row and the verdict).
    """
    infos: dict[Path, tuple[AudioInfo, str] | str] = {}  # per file: (header, sha256) or the problem
    reported: set[tuple[str, Path]] = set()
    planned, skipped = [], []
    for record in records:
        if record.audio not in infos:
            infos[record.audio] = _inspect(record.audio)
        first = (record.where, record.audio) not in reported
        reported.add((record.where, record.audio))
        found = infos[record.audio]
        if isinstance(found, str):
            if first:
                problems.report(record.where, found)
            skipped.append((record, found))
            continue
        info, sha = found
        if first and info.truncation_note():
            problems.warn(record.where, info.truncation_note())
        cropped = max_duration is not None and info.seconds > max_duration
        key_data = {
            "audio_sha256": sha,
            "model_hash": model_hash,
            "preprocess_version": PREPROCESS_VERSION,
            # Only cropped items depend on the crop settings; each repeat copy of a long file gets its own crop.
            "crop": {"max_duration": max_duration, "seed": seed, "copy": record.repeat} if cropped else None,
            "text": {name: getattr(record, name) for name in _TEXT_FIELDS},
        }
        key = hashlib.sha256(json.dumps(key_data, sort_keys=True).encode()).hexdigest()
        planned.append(_Planned(record, key, sha, info, cropped))
    problems.summarize(len(records), "items")
    return planned, skipped


def _inspect(path: Path) -> tuple[AudioInfo, str] | str:
    """Header facts and content hash of one file, or why it cannot be used (empty, too short, unreadable)."""
    try:
        info = inspect_audio(path)
        check_encodable(info)
        return info, _sha256_file(path)
    except (AudioError, OSError) as e:
        return str(e)


@dataclass(frozen=True)
class _Loaded:
    planned: _Planned
    audio: torch.Tensor  # [2, N] 48 kHz, already cropped
    record: Record  # with the crop's duration
    notes: list[str]  # warnings about this item's audio, kept in its cache file


def _encode_all(
    todo: list[_Planned], encoder: Encoder, cache_dir: Path, max_duration: float | None, seed: int,
    batch_size: int, progress: bool, rank: int, problems: Problems,
) -> None:
    batch: list[_Loaded] = []
    bar = tqdm(todo, desc=f"caching (rank {rank})", disable=not progress, unit="item")
    for p in bar:
        failed = cache_dir / f"items/{p.key}.failed.json"
        try:
            audio, notes = _load(p, max_duration, seed)
        except AudioError as e:
            # The marker tells rank 0 (writing the manifest) that this item was skipped, not lost.
            write_json_if_changed(failed, {"problem": str(e)})
            problems.report(p.record.where, str(e), cause=e)
            continue
        if failed.exists():
            failed.unlink(missing_ok=True)
        for note in notes:
            problems.warn(p.record.where, note)
        # The encoder writes the duration into the metas string: it must be the crop's, not the song's.
        batch.append(_Loaded(p, audio, replace(p.record, duration=audio.shape[-1] / SAMPLE_RATE), notes))
        if len(batch) == batch_size:
            _encode_batch(batch, encoder, cache_dir)
            batch = []
    if batch:
        _encode_batch(batch, encoder, cache_dir)
    problems.summarize(len(todo), "items")


def _load(p: _Planned, max_duration: float | None, seed: int) -> tuple[torch.Tensor, list[str]]:
    """Decode the item's window: a random crop for long files (only that window is read), else the whole file."""
    if not p.cropped:
        return read_window(p.info)
    # The crop depends on (seed, audio, copy) only, so every rank and every rerun cuts the same window.
    rng = np.random.default_rng([seed, int(p.audio_sha[:15], 16), p.record.repeat])
    start, length = crop_window(resampled_length(p.info.frames, p.info.samplerate), max_duration, rng)
    return read_window(p.info, start, length)


def _encode_batch(batch: list[_Loaded], encoder: Encoder, cache_dir: Path) -> None:
    longest = max(item.audio.shape[-1] for item in batch)
    audio = torch.zeros(len(batch), 2, longest)
    for i, item in enumerate(batch):
        audio[i, :, : item.audio.shape[-1]] = item.audio
    records = [item.record for item in batch]
    with torch.no_grad():
        outputs = encoder.encode(audio, records)
    if not isinstance(outputs, (list, tuple)) or len(outputs) != len(batch):
        raise TypeError(f"encoder.encode returned {type(outputs).__name__} of length "
                        f"{len(outputs) if hasattr(outputs, '__len__') else '?'} for {len(batch)} items")
    for item, out in zip(batch, outputs):
        record = item.record
        tensors = _check_output(out, item.audio.shape[-1], record, getattr(encoder, "latent_dim", LATENT_DIM))
        metadata = {"id": record.id, "row": str(record.row), "duration": repr(record.duration),
                    "preprocess_version": PREPROCESS_VERSION}
        if item.notes:
            metadata["warnings"] = json.dumps(item.notes)
        _save_atomic(cache_dir / item.planned.file, tensors, metadata)


def _check_output(out: dict, n_samples: int, record: Record, latent_dim: int = LATENT_DIM) -> dict[str, torch.Tensor]:
    """Validate one item from the encoder. These are model-side bugs or numerics, so they always raise."""
    where = f"{record.where} ({record.audio})"
    if not isinstance(out, dict) or not all(isinstance(out.get(k), torch.Tensor) for k in TENSOR_KEYS):
        raise TypeError(f"{where}: encoder output must be a dict with {TENSOR_KEYS}, got {out!r:.200}")
    tensors = {k: out[k].detach().to("cpu").contiguous() for k in TENSOR_KEYS}
    latents, text, lyrics = (tensors[k] for k in TENSOR_KEYS)
    if latents.ndim != 2 or latents.shape[1] != latent_dim:
        raise ValueError(f"{where}: latents must be [T, {latent_dim}], got {list(latents.shape)}")
    if abs(latents.shape[0] - n_samples / HOP) > 1:
        raise ValueError(f"{where}: {latents.shape[0]} latent frames for {n_samples} samples (expected about "
                         f"{n_samples / HOP:.1f}); did the encoder keep the batch padding?")
    for name, t in (("text_hidden", text), ("lyric_embeds", lyrics)):
        if t.ndim != 2 or t.shape[0] < 1:
            raise ValueError(f"{where}: {name} must be [L >= 1, E], got {list(t.shape)}")
    if text.shape[1] != lyrics.shape[1]:
        raise ValueError(f"{where}: text_hidden width {text.shape[1]} != lyric_embeds width {lyrics.shape[1]}")
    for name, t in tensors.items():
        if not torch.isfinite(t).all():
            # Upstream hit NaN latents too ("#318 detect and error on NaN latents").
            raise ValueError(f"{where}: encoder produced NaN/Inf in {name}")
    return tensors


def _save_atomic(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        save_file(tensors, str(tmp), metadata=metadata)
        with tmp.open("rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _write_manifest(
    path: Path, planned: list[_Planned], plan_skipped: list[tuple[Record, str]],
    model_hash: str, max_duration: float | None, seed: int,
) -> None:
    cache_dir = path.parent
    entries, skipped = [], [{"id": r.id, "row": r.row, "repeat": r.repeat, "problem": why} for r, why in plan_skipped]
    warnings = []
    for p in planned:
        file = cache_dir / p.file
        if file.exists():
            try:
                with safe_open(str(file), framework="pt") as f:
                    shapes = {k: f.get_slice(k).get_shape() for k in TENSOR_KEYS}
                    duration = float(f.metadata()["duration"])
                    notes = json.loads(f.metadata().get("warnings", "[]"))
            except (SafetensorError, OSError, KeyError, ValueError) as e:  # a damaged or foreign file: never guess
                raise DataError(f"row {p.record.row} ({p.record.id}): cached item {file} cannot be read ({e}); "
                                "delete it (or the cache folder) to encode it again") from e
            truncated = p.info.truncation_note()
            notes = ([truncated] if truncated else []) + notes
            warnings += [{"id": p.record.id, "row": p.record.row, "repeat": p.record.repeat, "problem": note}
                         for note in notes]
            entries.append({
                "id": p.record.id, "row": p.record.row, "repeat": p.record.repeat, "file": p.file,
                "n_frames": shapes["latents"][0], "text_len": shapes["text_hidden"][0],
                "lyric_len": shapes["lyric_embeds"][0], "duration": duration,
            })
            continue
        failed = cache_dir / f"items/{p.key}.failed.json"
        if not failed.exists():
            raise DataError(f"{p.record.where}: cache file {file} is missing after the build; did a rank fail?")
        skipped.append({"id": p.record.id, "row": p.record.row, "repeat": p.record.repeat,
                        "problem": json.loads(failed.read_text())["problem"]})
    if not entries:
        raise DataError(f"cache {cache_dir}: no item could be encoded ({len(skipped)} skipped)")
    # Unchanged (a complete cache): no write at all, so a finished cache can be shared read-only.
    write_json_if_changed(path, {
        "format": MANIFEST_FORMAT, "preprocess_version": PREPROCESS_VERSION, "model_hash": model_hash,
        "max_duration": max_duration, "seed": seed, "entries": entries, "skipped": skipped, "warnings": warnings,
    })


def _plan_digest(planned: list[_Planned], plan_skipped: list[tuple[Record, str]], model_hash: str,
                 max_duration: float | None, seed: int) -> str:
    data = [[p.record.id, p.record.repeat, p.key] for p in planned]
    data += [[r.id, r.repeat, None] for r, _ in plan_skipped]
    blob = json.dumps([data, model_hash, max_duration, seed, PREPROCESS_VERSION]).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def _warn_about_crops(planned: list[_Planned], max_duration: float | None) -> None:
    """Cropping keeps whole-song lyrics (docs/training.md §9.5); say how many items that affects."""
    affected = [p for p in planned if p.cropped and p.record.lyrics.strip().lower() not in _NO_LYRICS]
    if affected:
        log.warning(
            "%d of %d items are longer than max_duration=%s s and get a random crop, but their lyrics describe "
            "the whole song (there is no lyric timing to crop them), e.g. %s", len(affected), len(planned),
            max_duration, affected[0].record.where,
        )
    for p in planned:
        stated = p.record.duration
        if p.record.repeat == 0 and stated is not None and not math.isclose(stated, p.seconds, abs_tol=1.0):
            log.warning("%s: metadata duration %.1f s differs from the audio file's %.1f s; the cache uses the "
                        "file's (cropped) length", p.record.where, stated, p.seconds)


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()

