"""Signals keep the work: SIGTERM / SIGINT / SIGUSR1 (outside SLURM) during the default run -> a checkpoint at the
next step, a non-zero exit (128 + signum), and a resume from that checkpoint that completes. A short run is never
without a checkpoint: ``last.ckpt`` is refreshed at every epoch end by default."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from train_helpers import FakeTrainer as _FakeTrainer

REPO = Path(__file__).resolve().parents[2]
QUICK = ["callbacks.validation_audio=null", "trainer.enable_progress_bar=false", "logger=[csv]", "exports=[acestep]"]
STEPS_PER_EPOCH = 4  # the demo data: 8 clips, batch 2


def start_default_run(tmp_path: Path, *overrides: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests")]), "OMP_NUM_THREADS": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    env.pop("SLURM_NTASKS", None)
    env.pop("SLURM_JOB_ID", None)
    (tmp_path / "cwd").mkdir(exist_ok=True)
    log = open(tmp_path / f"log{len(list(tmp_path.glob('log*')))}.txt", "w")
    return subprocess.Popen([sys.executable, "-m", "acestep_train", f"hydra.run.dir={tmp_path / 'run'}", *QUICK,
                             *overrides], cwd=tmp_path / "cwd", env=env, stdout=log, stderr=subprocess.STDOUT)


def wait_for(predicate, proc: subprocess.Popen, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert proc.poll() is None, f"the run ended (status {proc.returncode}) before {what}"
        assert time.monotonic() < deadline, f"no {what} after {timeout} s"
        time.sleep(0.1)


def ckpt_state(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def interrupt(tmp_path: Path, signum: int) -> tuple[int, dict, str]:
    """Start a long default run, wait for its first epoch-end checkpoint, send ``signum``; return the exit status,
    the checkpoint it left and its log."""
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    proc = start_default_run(tmp_path, "trainer.max_epochs=1000")
    try:
        wait_for(last.exists, proc, 600, "epoch-end checkpoint")  # the old default: none before step 100
        at_signal = ckpt_state(last)["global_step"]
        assert at_signal == STEPS_PER_EPOCH
        proc.send_signal(signum)
        status = proc.wait(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    log = (tmp_path / "log0.txt").read_text(errors="replace")
    return status, ckpt_state(last), log


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signal_checkpoints_exits_nonzero_and_resumes(tmp_path, signum):
    status, state, log = interrupt(tmp_path, signum)
    assert status == 128 + signum, log[-3000:]  # the old code: SIGTERM exited 0, SIGINT 1; neither saved
    assert state["global_step"] > STEPS_PER_EPOCH, "the signal's checkpoint was not written"
    name = signal.Signals(signum).name
    assert f"{name}: saved {tmp_path / 'run' / 'checkpoints' / 'last.ckpt'} at step {state['global_step']}" in log
    assert not (tmp_path / "run" / "exports").exists()  # stopped: no exports of a half-trained run

    epochs = state["epoch"] + 2  # resume and finish two more epochs
    proc = start_default_run(tmp_path, f"ckpt_path={tmp_path / 'run' / 'checkpoints' / 'last.ckpt'}",
                             f"trainer.max_epochs={epochs}")
    assert proc.wait(timeout=600) == 0, (tmp_path / "log1.txt").read_text()[-3000:]
    final = ckpt_state(tmp_path / "run" / "checkpoints" / "last.ckpt")
    assert final["global_step"] == epochs * STEPS_PER_EPOCH
    assert (tmp_path / "run" / "exports" / "lora.safetensors").is_file()


def test_stop_on_signal_in_process(tmp_path, monkeypatch):
    """The callback alone: a flag in the handler, a checkpoint at the next optimizer step (not mid accumulation),
    exit status 128 + signum; before training a signal stops at once; the previous handlers come back."""
    from acestep_train.training.strategies import StopOnSignal, StoppedBySignal

    previous = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)}
    trainer = _FakeTrainer(tmp_path)
    cb = StopOnSignal(tmp_path / "ckpts", on_slurm=False)
    try:
        with pytest.raises(StoppedBySignal) as stopped:
            os.kill(os.getpid(), signal.SIGTERM)  # before training: nothing to save, stop now
        assert stopped.value.code == 143 and trainer.saved == []
        cb.on_train_start(trainer, None)
        cb.on_train_batch_end(trainer)
        os.kill(os.getpid(), signal.SIGUSR1)  # only a flag
        assert cb.requested and trainer.saved == []
        cb.on_train_batch_end(trainer)  # no optimizer step since the last check (gradient accumulation)
        assert trainer.saved == []
        trainer.global_step = 6
        with pytest.raises(StoppedBySignal) as stopped:
            cb.on_train_batch_end(trainer)
        assert stopped.value.code == 128 + signal.SIGUSR1
        assert trainer.saved == [str(tmp_path / "ckpts" / "last.ckpt")]
    finally:
        cb.restore()
    assert {s: signal.getsignal(s) for s in previous} == previous
