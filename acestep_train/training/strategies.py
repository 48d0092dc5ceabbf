"""Multi-process training: Lightning strategies configured for the ACE-Step DiT (``trainer=fsdp|deepspeed_zero2|...``),
and what makes a preempted or time-limited SLURM job resume itself exactly (``SlurmRequeue``, ``resolve_ckpt_path``).
"""

from __future__ import annotations

import importlib.util
import logging
import os
import signal
import subprocess
import threading
import time
from collections.abc import Mapping
from pathlib import Path

import lightning as L
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy

from acestep_train.models.dit import DiTLayer

log = logging.getLogger(__name__)


def fsdp(sharding_strategy: str = "FULL_SHARD", activation_checkpointing: bool = True, cpu_offload: bool = False,
         state_dict_type: str = "sharded") -> FSDPStrategy:
    """FSDP with one DiT layer per wrapped unit (the natural all-gather granularity), optional per-layer
    activation checkpointing, and sharded checkpoints."""
    return FSDPStrategy(
        auto_wrap_policy={DiTLayer},
        activation_checkpointing_policy={DiTLayer} if activation_checkpointing else None,
        sharding_strategy=sharding_strategy,
        cpu_offload=cpu_offload,
        state_dict_type=state_dict_type,
        use_orig_params=True,  # LoRA: frozen and trainable parameters share FSDP units
    )


def deepspeed(stage: int = 2, offload_optimizer: bool = False, offload_parameters: bool = False) -> DeepSpeedStrategy:
    """DeepSpeed ZeRO ``stage`` (2 or 3); CPU offload of optimizer state (and parameters at stage 3)."""
    if importlib.util.find_spec("deepspeed") is None:
        raise RuntimeError("trainer=deepspeed_* needs DeepSpeed: pip install 'acestep-train[deepspeed]'")
    if stage not in (2, 3):
        raise ValueError(f"DeepSpeed stage {stage}: this project configures ZeRO stage 2 or 3")
    return DeepSpeedStrategy(stage=stage, offload_optimizer=offload_optimizer,
                             offload_parameters=offload_parameters and stage == 3)


# ---- preemption: checkpoint + requeue on SLURM's warning signal, resume on restart -----------------------------
HPC_PREFIX = "hpc_ckpt_"  # Lightning's name for the checkpoints its SLURM requeue writes into default_root_dir


def in_slurm_job(env: Mapping[str, str] = os.environ) -> bool:
    """A SLURM batch job that Lightning treats as such (not an interactive ``bash``/``interactive`` allocation)."""
    return "SLURM_NTASKS" in env and env.get("SLURM_JOB_NAME") not in ("bash", "interactive")


def resolve_ckpt_path(ckpt_path: str | None, run_dir: Path | str, checkpoint_dir: Path | str | None = None,
                      on_slurm: bool | None = None) -> str | None:
    """The checkpoint ``trainer.fit`` resumes from.

    ``ckpt_path=auto`` (and ``null`` inside a SLURM batch job, so that a requeued job resumes by itself) picks the
    newest (by modification time) of ``<checkpoint_dir>/last.ckpt`` and ``<run_dir>/hpc_ckpt_*.ckpt``, or None
    (a fresh start) when there is neither. ``scontrol requeue``, a node failure or a preemption kill the job
    without warning, leaving only the periodic ``last.ckpt``; the time-limit signal leaves an ``hpc_ckpt_N.ckpt``
    (``SlurmRequeue``). Lightning alone would consider only the hpc checkpoints, even a stale one. Any other value is
    returned unchanged.
    """
    if on_slurm is None:
        on_slurm = in_slurm_job()
    if not (ckpt_path == "auto" or (ckpt_path is None and on_slurm)):
        return ckpt_path
    run_dir = Path(run_dir)
    last = Path(checkpoint_dir or run_dir / "checkpoints") / "last.ckpt"
    found = [p for p in (last, *run_dir.glob(f"{HPC_PREFIX}*.ckpt")) if p.exists()]
    if not found:
        log.info("ckpt_path=%s: no checkpoint in %s yet, starting fresh", ckpt_path, run_dir)
        return None
    newest = max(found, key=lambda p: p.stat().st_mtime_ns)
    log.info("ckpt_path=%s: resuming from %s", ckpt_path, newest)
    return str(newest)


class SlurmRequeue(L.Callback):
    """On SLURM's warning signal (``#SBATCH --signal=SIGUSR1@90``), checkpoint at the next optimizer step on every
    rank together, ``scontrol requeue`` the job, and wait for SLURM to stop it; the restart resumes from that
    ``<run>/hpc_ckpt_N.ckpt`` (``resolve_ckpt_path``).

    Replaces Lightning's own SIGUSR1 handler (which this one's presence disables), because that one saves and
    synchronises inside the signal handler, wherever each rank happens to be: under DDP rank 0's checkpoint barrier
    can meet rank 1's gradient all-reduce (a hang), and a checkpoint taken mid-step does not resume exactly. Here the
    handler only sets a flag; after each optimizer step the ranks agree on it (one boolean all-reduce), so the
    checkpoint is taken at a step boundary, exactly like a periodic one.

    Inactive (and the signal untouched) outside a SLURM batch job. Built early in ``run`` so that a signal during
    model loading or cache building is kept, not fatal (SIGUSR1's default action ends the process).

    Args:
        signum: the warning signal (``--signal=SIGUSR1@...``).
        wait_s: how long to wait for SLURM to stop the job after a successful requeue before giving up with an
            error (SLURM sends SIGTERM and, after ``KillWait``, SIGKILL).
    """

    def __init__(self, signum: int = signal.SIGUSR1, wait_s: float = 600.0):
        self.signum = signum
        self.wait_s = wait_s
        self.requested = False
        self._last_step: int | None = None
        self.active = in_slurm_job() and threading.current_thread() is threading.main_thread()
        self._previous = signal.signal(signum, self._on_signal) if self.active else None

    def _on_signal(self, signum, frame) -> None:  # only a flag: no I/O, no collectives inside a signal handler
        self.requested = True

    def teardown(self, trainer: L.Trainer, module: L.LightningModule, stage: str) -> None:
        if self.active and threading.current_thread() is threading.main_thread():
            signal.signal(self.signum, self._previous if self._previous is not None else signal.SIG_DFL)
            self.active = False

    def on_train_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self._last_step = trainer.global_step

    def on_train_batch_end(self, trainer: L.Trainer, *args) -> None:
        if not self.active or trainer.global_step == self._last_step:
            return  # not on SLURM, or mid gradient accumulation (no optimizer step since the last check)
        self._last_step = trainer.global_step
        if not trainer.strategy.reduce_boolean_decision(self.requested, all=False):
            return
        self.requested = False
        path = trainer.strategy.broadcast(
            trainer._checkpoint_connector.hpc_save_path(trainer.default_root_dir) if trainer.is_global_zero else None)
        trainer.save_checkpoint(path)
        requeued = trainer.strategy.broadcast(self._requeue(path) if trainer.is_global_zero else None)
        if not requeued:
            return  # keep training; the next signal tries again
        log.info("rank %d: waiting for SLURM to stop this job (requeued)", trainer.global_rank)
        deadline = time.monotonic() + self.wait_s
        while time.monotonic() < deadline:
            time.sleep(1.0)
        raise RuntimeError(f"the job was requeued, but SLURM did not stop it within {self.wait_s:.0f} s")

    @staticmethod
    def _requeue(path: str) -> bool:
        array_job = os.environ.get("SLURM_ARRAY_JOB_ID")
        job = f"{array_job}_{os.environ['SLURM_ARRAY_TASK_ID']}" if array_job else os.environ["SLURM_JOB_ID"]
        try:
            proc = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True, timeout=60)
        except (OSError, subprocess.TimeoutExpired) as err:
            log.warning("saved %s but could not requeue SLURM job %s: %s", path, job, err)
            return False
        if proc.returncode != 0:
            log.warning("saved %s but `scontrol requeue %s` failed (%d): %s", path, job, proc.returncode,
                        (proc.stderr or proc.stdout).strip())
            return False
        log.info("saved %s and requeued SLURM job %s", path, job)
        return True
