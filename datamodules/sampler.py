"""Length-bucketed batch sampler: batches of similar length (little padding), sharded across ranks.

Per epoch, with a generator seeded by ``(seed, epoch)``:
  1. shuffle all item indices; if their number is not a multiple of ``world_size``, repeat the first few
     (the ``DistributedSampler`` convention) so every rank gets the same number of items and therefore the
     same number of steps - DDP hangs if one rank runs out of batches early;
  2. cut the shuffled list into pools of ``pool_batches`` global batches (``batch_size * world_size`` items
     each) and sort each pool by length: items in a global batch have similar lengths, while which items
     meet still changes every epoch;
  3. cut the pools into global batches and shuffle their order;
  4. rank r takes items ``r, r + world_size, ...`` of each global batch, so all ranks hold a batch of about
     the same length at each step (none waits on a straggler).
Every item is seen exactly once per epoch across ranks, apart from the < ``world_size`` padding repeats
(and the dropped tail with ``drop_last``).

Lightning: it calls ``set_epoch`` only on ``dataloader.sampler`` and ``dataloader.batch_sampler.sampler``
(``lightning.fabric.utilities.data._set_sampler_epoch``), so ``self.sampler`` forwards it to us. Run the
Trainer with ``use_distributed_sampler=False``: this sampler shards by itself, and Lightning's injected
DistributedSampler would shard a second time.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch.utils.data import Sampler


class _EpochForwarder:
    """Receives Lightning's ``set_epoch`` call at ``batch_sampler.sampler`` (see the module docstring)."""

    def __init__(self, owner: "BucketBatchSampler") -> None:
        self._owner = owner

    def set_epoch(self, epoch: int) -> None:
        self._owner.set_epoch(epoch)


class BucketBatchSampler(Sampler[list[int]]):
    """Yield lists of dataset indices for one rank.

    Args:
        lengths: length of each item (latent frames), e.g. ``CachedDataset.n_frames``.
        batch_size: items per batch on each rank.
        shuffle: False gives a fixed order (sorted by length, for validation); True shuffles per epoch.
        seed: base seed; the order is a pure function of (seed, epoch, lengths, rank, world_size).
        rank, world_size: this process's shard.
        drop_last: drop the final smaller batch (same on every rank).
        pool_batches: how many global batches are sorted together; larger = less padding, less randomness.
    """

    def __init__(
        self,
        lengths: Sequence[int],
        batch_size: int,
        *,
        shuffle: bool = True,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        drop_last: bool = False,
        pool_batches: int = 50,
    ) -> None:
        if isinstance(lengths, Sampler):
            # Lightning re-instantiates batch samplers as cls(sampler, batch_size=, drop_last=) to inject a
            # DistributedSampler; without this check that would silently treat sampler indices as lengths.
            raise TypeError("BucketBatchSampler shards across ranks itself; run the Trainer with "
                            "use_distributed_sampler=False")
        if batch_size < 1 or pool_batches < 1:
            raise ValueError(f"batch_size and pool_batches must be >= 1, got {batch_size}, {pool_batches}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
        if len(lengths) == 0:
            raise ValueError("BucketBatchSampler: no items")
        self.lengths = torch.as_tensor(list(lengths), dtype=torch.long)
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.drop_last = drop_last
        self.pool_batches = pool_batches
        self.epoch = 0
        self.sampler = _EpochForwarder(self)
        self._resume: tuple[int, int] | None = None  # (epoch, batches already trained in it)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def resume(self, epoch: int, batches_done: int) -> None:
        """Make the next pass over ``epoch`` start after its first ``batches_done`` batches (exact resume of an
        interrupted epoch: the order is a pure function of (seed, epoch), so nothing repeats or is skipped)."""
        if batches_done < 0:
            raise ValueError(f"batches_done must be >= 0, got {batches_done}")
        self._resume = (int(epoch), int(batches_done))

    def __len__(self) -> int:
        return len(self._global_batches())

    def __iter__(self) -> Iterator[list[int]]:
        skip = 0
        if self._resume is not None and self._resume[0] == self.epoch:
            skip = self._resume[1]
            self._resume = None
        for batch in self._global_batches()[skip:]:
            yield batch[self.rank :: self.world_size]

    def _global_batches(self) -> list[list[int]]:
        n, ws = len(self.lengths), self.world_size
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        order = torch.randperm(n, generator=generator) if self.shuffle else torch.arange(n)
        padded = -n % ws
        order = torch.cat([order, order.repeat(padded // n + 1)[:padded]])
        global_size = self.batch_size * ws
        pool_size = global_size * self.pool_batches if self.shuffle else len(order)
        batches = []
        for start in range(0, len(order), pool_size):
            pool = order[start : start + pool_size]
            # Stable sort: equal lengths keep the shuffled order, so ties are still mixed each epoch.
            pool = pool[torch.sort(self.lengths[pool], stable=True).indices]
            batches += [pool[i : i + global_size].tolist() for i in range(0, len(pool), global_size)]
        # Only the very last batch can be short (every pool but the last is a whole number of batches).
        if self.drop_last and len(batches[-1]) < global_size:
            batches.pop()
            if not batches:
                raise ValueError(f"drop_last with {n} items and a global batch of {global_size} "
                                 f"(batch_size {self.batch_size} x world_size {ws}) leaves no batch")
        if self.shuffle:
            batches = [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]
        return batches
