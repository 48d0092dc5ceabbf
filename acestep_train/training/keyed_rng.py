"""Random numbers keyed on where they are used, so that a run's draws are a pure function of its position in
training: a resumed run draws exactly what the uninterrupted one drew, and a DDP step draws for every sample what
one process training the whole global batch draws.

Every key comes from one function, :func:`draw_key` ``(seed, step, position, stream)``; each :class:`Stream` names
what is drawn and what ``position`` means for it, and different streams never share a key.
"""

from __future__ import annotations

import enum
from collections.abc import Iterator
from contextlib import contextmanager

import torch

KEY_MODULUS = 2**63  # torch generators take a non-negative 64-bit seed; keys are kept below 2^63


class Stream(enum.Enum):
    """What a keyed generator draws for, and what ``position`` means."""

    SAMPLE = "sample"  # condition dropout, t and noise of one training sample; position: its index in the global batch
    BATCH = "batch"  # one generator for a whole batch, the same at every step; position: the batch index (validation,
    # or 0 for the debug fixed draws)
    MODEL = "model"  # randomness inside the forward (e.g. LoRA dropout) from the global RNG; position: the rank


def draw_key(seed: int, step: int | None, position: int, stream: Stream) -> int:
    """The seed of the generator for ``stream`` at micro-batch ``step`` (None: not keyed on the step) and ``position``.

    These are the formulas every run of this trainer has drawn with; changing them would change every run's draws,
    so they are kept as they are. They use Python's ``hash`` of a tuple of ints, which is deterministic from run to
    run and process to process: ``PYTHONHASHSEED`` salts only str and bytes, an int hashes to itself modulo the
    Mersenne prime 2^61 - 1, and tuples combine element hashes with a fixed algorithm (the same on every 64-bit
    CPython since 3.8). The trailing 1 of the sample key and the +1 of the model key keep those two streams apart.
    """
    if stream is Stream.SAMPLE:
        if step is None:
            raise ValueError("per-sample draws are keyed on the step; use Stream.BATCH for fixed draws")
        key = hash((seed, step, position, 1))
    elif stream is Stream.MODEL:
        key = (seed if step is None else hash((seed, step, position))) + 1
    elif stream is Stream.BATCH:
        key = seed + position
    else:
        raise ValueError(f"unknown stream {stream!r}")
    return key % KEY_MODULUS


def keyed_generator(seed: int, step: int | None, position: int, stream: Stream) -> torch.Generator:
    """A CPU generator seeded with :func:`draw_key` (draws are made on the CPU, so they do not depend on the device)."""
    return torch.Generator().manual_seed(draw_key(seed, step, position, stream))


@contextmanager
def keyed_global_rng(key: int, device: torch.device | str) -> Iterator[None]:
    """Run a block with the global RNG of the CPU and of ``device`` seeded by ``key``, and restore both afterwards.

    Model code (dropout) draws from the global RNG, which a generator argument cannot reach. Seeding it from a key
    makes those draws reproducible on resume; restoring it afterwards means nothing outside the block sees a
    reseeded RNG. Gradient checkpointing stores and restores the RNG state of each recomputed layer itself, so a
    backward pass outside the block recomputes the same dropout masks. Only the CPU and CUDA generators are keyed
    (the devices this trainer runs on); other CUDA devices are neither touched nor initialised.
    """
    device = torch.device(device)
    cuda = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda):
        torch.random.default_generator.manual_seed(key)
        for index in cuda:
            with torch.cuda.device(index):
                torch.cuda.manual_seed(key)
        yield
