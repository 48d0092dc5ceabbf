"""Length-bucketed batch sampler (coverage across ranks, determinism) and collate padding/masks."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from torch.utils.data import SequentialSampler

from datamodules.batch import Batch
from datamodules.collate import collate
from datamodules.sampler import BucketBatchSampler

LENGTHS = [int(x) for x in torch.randint(10, 500, (53,), generator=torch.Generator().manual_seed(0))]


def _epoch(world_size: int, epoch: int = 0, **kwargs) -> list[list[list[int]]]:
    out = []
    for rank in range(world_size):
        s = BucketBatchSampler(LENGTHS, 4, rank=rank, world_size=world_size, seed=3, pool_batches=2, **kwargs)
        s.set_epoch(epoch)
        out.append(list(s))
    return out


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_every_item_once_per_epoch_across_ranks(world_size: int) -> None:
    per_rank = _epoch(world_size)
    # Same number of steps on every rank (DDP would hang otherwise), matching len().
    assert len({len(batches) for batches in per_rank}) == 1
    assert len(per_rank[0]) == len(BucketBatchSampler(LENGTHS, 4, world_size=world_size, pool_batches=2))
    counts = Counter(i for batches in per_rank for batch in batches for i in batch)
    assert set(counts) == set(range(len(LENGTHS)))
    # Only the padding to a multiple of world_size repeats items.
    padding = -len(LENGTHS) % world_size
    assert sum(counts.values()) == len(LENGTHS) + padding
    assert sum(c - 1 for c in counts.values()) == padding
    assert all(len(b) <= 4 for batches in per_rank for b in batches)


def test_deterministic_per_seed_and_epoch_and_changes_between_epochs() -> None:
    assert _epoch(2, epoch=0) == _epoch(2, epoch=0)
    assert _epoch(2, epoch=0) != _epoch(2, epoch=1)
    a = BucketBatchSampler(LENGTHS, 4, seed=1)
    b = BucketBatchSampler(LENGTHS, 4, seed=2)
    assert list(a) != list(b)


def test_lightning_set_epoch_path_reaches_the_sampler() -> None:
    # Lightning calls dataloader.batch_sampler.sampler.set_epoch(epoch).
    s = BucketBatchSampler(LENGTHS, 4)
    first = list(s)
    s.sampler.set_epoch(5)
    assert s.epoch == 5 and list(s) != first


def test_batches_group_similar_lengths() -> None:
    s = BucketBatchSampler(LENGTHS, 4, pool_batches=100)
    def waste(batches):
        return sum(max(LENGTHS[i] for i in b) * len(b) - sum(LENGTHS[i] for i in b) for b in batches)
    g = torch.Generator().manual_seed(0)
    perm = torch.randperm(len(LENGTHS), generator=g).tolist()
    random_batches = [perm[i : i + 4] for i in range(0, len(perm), 4)]
    assert waste(list(s)) < waste(random_batches) / 4


def test_drop_last_and_unshuffled_order() -> None:
    s = BucketBatchSampler(LENGTHS, 4, drop_last=True)
    batches = list(s)
    assert len(batches) == len(LENGTHS) // 4 and all(len(b) == 4 for b in batches)
    fixed = list(BucketBatchSampler(LENGTHS, 4, shuffle=False))
    flat = [i for b in fixed for i in b]
    assert [LENGTHS[i] for i in flat] == sorted(LENGTHS)
    with pytest.raises(ValueError, match="leaves no batch"):
        list(BucketBatchSampler([1, 2, 3], 3, world_size=2, drop_last=True))


def test_refuses_lightnings_sampler_injection() -> None:
    with pytest.raises(TypeError, match="use_distributed_sampler=False"):
        BucketBatchSampler(SequentialSampler(range(5)), batch_size=2, drop_last=False)
    with pytest.raises(ValueError, match="rank 2 is not in"):
        BucketBatchSampler(LENGTHS, 2, rank=2, world_size=2)


def _item(t: int, lt: int, ll: int, name: str, width: int = 8) -> dict:
    return {"latents": torch.randn(t, 64), "text_hidden": torch.randn(lt, width),
            "lyric_embeds": torch.randn(ll, width), "id": name}


def test_collate_pads_with_zeros_and_masks_valid_positions() -> None:
    items = [_item(5, 3, 7, "a"), _item(2, 6, 1, "b")]
    batch = collate(items)
    assert isinstance(batch, Batch) and batch.ids == ["a", "b"] and len(batch) == 2
    assert batch.latents.shape == (2, 5, 64) and batch.text_hidden.shape == (2, 6, 8)
    assert batch.lyric_embeds.shape == (2, 7, 8)
    assert batch.latent_mask.tolist() == [[True] * 5, [True] * 2 + [False] * 3]
    assert batch.text_mask.tolist() == [[True] * 3 + [False] * 3, [True] * 6]
    assert batch.lyric_mask.tolist() == [[True] * 7, [True] + [False] * 6]
    assert batch.latent_mask.dtype == torch.bool
    assert torch.equal(batch.latents[1, :2], items[1]["latents"])
    assert batch.latents[1, 2:].abs().sum() == 0 and batch.text_hidden[0, 3:].abs().sum() == 0
    assert torch.equal(batch.lyric_embeds[0], items[0]["lyric_embeds"])
    assert batch.refer_latents is None


def test_collate_refuses_mixed_widths() -> None:
    with pytest.raises(ValueError, match=r"text_hidden items differ .*'b', \[3, 16\]"):
        collate([_item(2, 3, 3, "a"), _item(2, 3, 3, "b", width=16)])
