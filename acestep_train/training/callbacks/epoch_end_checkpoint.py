"""``last.ckpt`` refreshed at every epoch end, next to the periodic step checkpoints.

Lightning's ModelCheckpoint takes either a step interval or an epoch interval, not both, and a second ModelCheckpoint
would write every epoch-end checkpoint twice (its own file plus ``last.ckpt``). With only a step interval, a run
shorter than the interval (the 40-step embedded default against 100) has no checkpoint until it ends.
"""

from __future__ import annotations

from pathlib import Path

import lightning as L


class EpochEndCheckpoint(L.Callback):
    """Save ``<dirpath>/last.ckpt`` when a training epoch ends (the file ``ckpt_path=auto`` resumes from).

    Args:
        dirpath: the checkpoint folder (the periodic ModelCheckpoint's ``dirpath``).
        filename: the file written there.
    """

    def __init__(self, dirpath: str | Path, filename: str = "last.ckpt"):
        self.path = Path(dirpath) / filename
        self._saved_step: int | None = None

    def on_train_epoch_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        if trainer.fast_dev_run or trainer.sanity_checking or self._saved_step == trainer.global_step:
            return
        if trainer.should_stop:  # stopped mid-epoch (max_steps, a callback): the step checkpoints have that step
            return
        if trainer.world_size > 1:
            # Multi-process runs rely on the step checkpoints: a save is collective (barrier), and when the ranks'
            # epochs differ in length one rank's epoch-end save met another rank's gradient all-reduce (a hang in
            # tests/training/test_distributed.py).
            return
        self._saved_step = trainer.global_step
        trainer.save_checkpoint(self.path)  # every rank calls it; the strategy decides who writes
