"""Keyed randomness: the keys runs were trained with, streams kept apart, the global RNG seeded only inside the
block, and DDP ranks drawing what one process draws."""

import pytest
import torch

from acestep_train.training.dtype_policy import DtypePolicy
from acestep_train.training.keyed_rng import Stream, draw_key, keyed_global_rng
from acestep_train.training.objective import Objective, ObjectiveConfig


def test_keys_are_the_ones_every_run_was_drawn_with():
    """Pinned literals: a changed key formula (or a hash that varies between processes) changes every run's draws.
    The values are those of the trainer's original formulas: hash((seed, step, position, 1)) per sample,
    hash((seed, step, rank)) + 1 for the model, seed + batch index for a whole batch."""
    assert draw_key(0, 0, 0, Stream.SAMPLE) == 5929087490696133568
    assert draw_key(42, 1234, 5, Stream.SAMPLE) == 4995426122214161928
    assert draw_key(0, 0, 0, Stream.MODEL) == 3010437511937009227
    assert draw_key(42, 1234, 5, Stream.MODEL) == 1821252940368109175
    assert draw_key(42, None, 5, Stream.MODEL) == 43  # fixed draws: the seed alone, + 1
    assert draw_key(42, None, 5, Stream.BATCH) == draw_key(42, 99, 5, Stream.BATCH) == 47  # never keyed on the step
    with pytest.raises(ValueError, match="keyed on the step"):
        draw_key(0, None, 0, Stream.SAMPLE)


def test_streams_steps_and_positions_get_different_keys():
    keys = [draw_key(seed, step, pos, stream) for seed in (0, 1) for step in range(20) for pos in range(8)
            for stream in (Stream.SAMPLE, Stream.MODEL)]
    assert len(set(keys)) == len(keys)
    assert all(0 <= k < 2**63 for k in keys)


def test_keyed_global_rng_seeds_inside_and_restores_outside():
    key = draw_key(3, 4, 0, Stream.MODEL)
    torch.manual_seed(11)
    before = torch.get_rng_state()
    with keyed_global_rng(key, "cpu"):
        inside = torch.rand(5)
    assert torch.equal(inside, torch.rand(5, generator=torch.Generator().manual_seed(key)))
    assert torch.equal(torch.get_rng_state(), before)
    torch.rand(1)  # negative control: an ordinary draw does move the state the check above compares
    assert not torch.equal(torch.get_rng_state(), before)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_keyed_global_rng_restores_the_cuda_generator_too():
    torch.cuda.manual_seed(5)
    before = torch.cuda.get_rng_state()
    with keyed_global_rng(123, "cuda"):
        a = torch.rand(4, device="cuda")
    with keyed_global_rng(123, "cuda"):
        b = torch.rand(4, device="cuda")
    assert torch.equal(a, b)
    assert torch.equal(torch.cuda.get_rng_state(), before)


def test_ddp_ranks_draw_what_one_process_draws():
    """Local item i of rank r is global item i * world + r: its generator is the single process's item."""
    objective = Objective(ObjectiveConfig(), seed=9, dtypes=DtypePolicy(torch.float32))
    single = [g.initial_seed() for g in objective.training_generators(step=6, batch_size=4)]
    ranks = [[g.initial_seed() for g in objective.training_generators(6, 2, rank=r, world_size=2)] for r in (0, 1)]
    assert [ranks[i % 2][i // 2] for i in range(4)] == single
    assert len(set(single)) == 4
    assert single != [g.initial_seed() for g in objective.training_generators(step=7, batch_size=4)]


def test_fixed_draws_use_one_generator_the_same_at_every_step():
    objective = Objective(ObjectiveConfig(fixed_draws=True), seed=9, dtypes=DtypePolicy(torch.float32))
    a, b = objective.training_generators(0, 3), objective.training_generators(50, 3, rank=1, world_size=2)
    assert isinstance(a, torch.Generator) and a.initial_seed() == b.initial_seed() == 9
    assert objective.validation_generator(2).initial_seed() == 9 + 2  # validation batch 2: the same every time
