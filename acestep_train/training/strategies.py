"""Multi-process training: Lightning strategies configured for the ACE-Step DiT (``trainer=fsdp|deepspeed_zero2|...``),
and what makes an interrupted run keep its work: a checkpoint at a step boundary on SIGTERM/SIGINT/SIGUSR1
(``StopOnSignal``), and a preempted or time-limited SLURM job that requeues and resumes itself exactly
(``resolve_ckpt_path``).
"""

from __future__ import annotations

import importlib.util
import logging
import os
import re
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


STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)


def next_hpc_path(run_dir: Path | str) -> Path:
    """``<run_dir>/hpc_ckpt_<N+1>.ckpt`` after the highest N there (the name Lightning's SLURM resume looks for)."""
    numbers = [int(m.group(1)) for p in Path(run_dir).glob(f"{HPC_PREFIX}*.ckpt")
               if (m := re.fullmatch(rf"{HPC_PREFIX}(\d+)\.ckpt", p.name))]
    return Path(run_dir) / f"{HPC_PREFIX}{max(numbers, default=0) + 1}.ckpt"


class StoppedBySignal(SystemExit):
    """Training stopped on a signal after saving a checkpoint; the exit status is 128 + the signal number."""


class StopOnSignal(L.Callback):
    """SIGTERM, SIGINT (Ctrl-C) and SIGUSR1 -> a checkpoint at the next optimizer step, on every rank together, then:

    - inside a SLURM batch job, on SLURM's warning signal (``#SBATCH --signal=SIGUSR1@90``): ``<run>/hpc_ckpt_N.ckpt``,
      ``scontrol requeue``, and a wait for SLURM to stop the job; the restart resumes from that checkpoint
      (``resolve_ckpt_path``);
    - otherwise: ``<checkpoint_dir>/last.ckpt`` (what ``ckpt_path=auto`` resumes from) and exit status 128 + signum
      (143 for SIGTERM, 130 for SIGINT), so a scheduler or a shell script sees that the run did not finish.

    The handler only sets a flag (no I/O, no collectives inside a signal handler); after each optimizer step the ranks
    agree on it (one boolean all-reduce), so the checkpoint is taken at a step boundary and resumes exactly, and no
    rank's save meets another rank's gradient all-reduce. Lightning's own handling is left out on purpose: its SLURM
    handler saves inside the signal handler wherever each rank is (the trainer is built with
    ``SLURMEnvironment(auto_requeue=False)``), and its SIGTERM handling stops after one more step, saves nothing and
    exits 0.

    Built early in ``run`` so that SLURM's warning during model loading or cache building is kept, not fatal. Before
    training starts (and after it ends) SIGINT and SIGTERM stop the process at once (nothing to save yet); a second
    Ctrl-C while a checkpoint is pending stops at once too. ``restore()`` puts the previous handlers back.

    Args:
        checkpoint_dir: where the ``last.ckpt`` of a stop outside SLURM goes (the ModelCheckpoint folder).
        requeue_signal: SLURM's warning signal (``--signal=SIGUSR1@...``).
        wait_s: how long to wait for SLURM to stop the job after a successful requeue before giving up with an
            error (SLURM sends SIGTERM and, after ``KillWait``, SIGKILL).
        on_slurm: inside a SLURM batch job (default: from the environment).
    """

    def __init__(self, checkpoint_dir: Path | str | None = None, requeue_signal: int = signal.SIGUSR1,
                 wait_s: float = 600.0, on_slurm: bool | None = None):
        self.checkpoint_dir = None if checkpoint_dir is None else Path(checkpoint_dir)
        self.requeue_signal = requeue_signal
        self.wait_s = wait_s
        self.on_slurm = in_slurm_job() if on_slurm is None else on_slurm
        self.received: int | None = None
        self.training = False
        self._waiting_for_slurm = False
        self._last_step: int | None = None
        self.active = threading.current_thread() is threading.main_thread()
        self._previous = {s: signal.signal(s, self._on_signal) for s in STOP_SIGNALS} if self.active else {}

    @property
    def requested(self) -> bool:
        return self.received is not None

    def _on_signal(self, signum, frame) -> None:
        if self._waiting_for_slurm and signum == signal.SIGTERM:
            raise StoppedBySignal(128 + signum)  # SLURM stopping the requeued job: everything is saved
        if signum != self.requeue_signal or not self.on_slurm:
            if not self.training or (signum == signal.SIGINT and self.received == signal.SIGINT):
                if signum == signal.SIGINT:
                    raise KeyboardInterrupt
                raise StoppedBySignal(128 + signum)  # nothing to save (yet)
        if self.received is None or signum != self.requeue_signal:
            self.received = signum  # SIGTERM/SIGINT outrank a pending requeue

    def restore(self) -> None:
        if self.active and threading.current_thread() is threading.main_thread():
            for s, previous in self._previous.items():
                signal.signal(s, previous if previous is not None else signal.SIG_DFL)
            self.active = False

    def on_train_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self._last_step = trainer.global_step
        self.training = True
        if self.active:  # Lightning installed its SIGTERM handler when fit began: ours decides
            signal.signal(signal.SIGTERM, self._on_signal)

    def on_train_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self.training = False
        if self.received is not None:
            log.warning("received signal %d after the last step: the run finished and saved as usual", self.received)

    def teardown(self, trainer: L.Trainer, module: L.LightningModule, stage: str) -> None:
        self.training = False

    def on_train_batch_end(self, trainer: L.Trainer, *args) -> None:
        if trainer.global_step == self._last_step:
            return  # mid gradient accumulation (no optimizer step since the last check)
        self._last_step = trainer.global_step
        if not trainer.strategy.reduce_boolean_decision(self.received is not None, all=False):
            return
        requeue = trainer.strategy.reduce_boolean_decision(
            self.on_slurm and self.received in (None, self.requeue_signal), all=True)
        signum = self.received or signal.SIGTERM  # a rank that got nothing stops like the one that did
        self.received = None
        if requeue:
            self._save_and_requeue(trainer)
            return
        path = trainer.strategy.broadcast(str(self._last_ckpt(trainer)) if trainer.is_global_zero else None)
        trainer.save_checkpoint(path)
        if trainer.is_global_zero:
            log.warning("%s: saved %s at step %d; resume with ckpt_path=%s", signal.Signals(signum).name, path,
                        trainer.global_step, path)
        raise StoppedBySignal(128 + signum)

    def _last_ckpt(self, trainer: L.Trainer) -> Path:
        return (self.checkpoint_dir or Path(trainer.default_root_dir) / "checkpoints") / "last.ckpt"

    def _save_and_requeue(self, trainer: L.Trainer) -> None:
        path = trainer.strategy.broadcast(str(next_hpc_path(trainer.default_root_dir)) if trainer.is_global_zero
                                          else None)
        trainer.save_checkpoint(path)
        requeued = trainer.strategy.broadcast(self._requeue(path) if trainer.is_global_zero else None)
        if not requeued:
            return  # keep training; the next signal tries again
        log.info("rank %d: waiting for SLURM to stop this job (requeued)", trainer.global_rank)
        self._waiting_for_slurm = True
        deadline = time.monotonic() + self.wait_s
        while time.monotonic() < deadline:
            time.sleep(1.0)
        self._waiting_for_slurm = False
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


SlurmRequeue = StopOnSignal  # the name the SLURM tests and docs know it by


def slurm_environment_plugins() -> list:
    """Inside a SLURM batch job: Lightning's SLURM environment without its own requeue handler (``StopOnSignal``
    does that at a step boundary)."""
    return [SLURMEnvironment(auto_requeue=False)] if in_slurm_job() else []
