"""Real training jobs on a local single-node SLURM cluster: a 2-task tiny CPU DDP job submitted with
``python -m acestep_train.launch.submit``, and the same job interrupted twice over, resuming exactly:

  - ``scontrol requeue`` (what a preemption or node failure looks like: the job is killed without warning) resumes
    from the run's last periodic checkpoint (``ckpt_path`` null inside SLURM = ``auto``);
  - SLURM's time-limit warning (``--signal=SIGUSR1@90``, sent here with ``scancel --signal=USR1``) makes the job save
    ``<run>/hpc_ckpt_1.ckpt`` at a step boundary and requeue itself (``acestep_train.training.strategies.SlurmRequeue``); the
    restart resumes from that checkpoint.
Both end at the same step with the same weights as the uninterrupted job.

    bash .ci/slurm-setup.sh && pytest -m slurm tests/test_slurm_training.py

Skipped like tests/test_slurm.py when SLURM is missing or not root, unless ACESTEP_REQUIRE_SLURM=1.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
TESTS = Path(__file__).resolve().parents[1]
HERE = Path(__file__).resolve().parent  # the probe callbacks below are imported by name in the training processes

from slurm_cluster import LocalSlurmCluster, slurm_available

REQUIRED = os.environ.get("ACESTEP_REQUIRE_SLURM") == "1"
pytestmark = [
    pytest.mark.slurm,
    pytest.mark.skipif(not slurm_available() and not REQUIRED, reason="SLURM not installed (bash .ci/slurm-setup.sh)"),
    pytest.mark.skipif(os.geteuid() != 0 and not REQUIRED, reason="LocalSlurmCluster is tested as root only"),
]

JOB_TIMEOUT = 900  # seconds per job; a tiny 2-rank CPU job takes ~1 min on 2 shared cores, a requeue adds ~30 s
MAX_STEPS = 4
HOLD_STEP = 2


class HoldAt(L.Callback):
    """Test callback: on the job's first start only, after optimizer step ``step`` (before that step's periodic
    checkpoint), write ``marker`` and wait: until killed (``until="kill"``), or until this rank has received SLURM's
    warning signal (``until="signal"``), so the interruption lands at a known step."""

    def __init__(self, step: int, marker: str, until: str = "kill", timeout: float = 600):
        self.step, self.marker, self.until, self.timeout = step, Path(marker), until, timeout

    def on_train_batch_end(self, trainer, *args) -> None:
        if trainer.global_step != self.step or os.environ.get("SLURM_RESTART_COUNT", "0") != "0":
            return
        from acestep_train.training.strategies import SlurmRequeue

        requeue = next(cb for cb in trainer.callbacks if isinstance(cb, SlurmRequeue))
        if trainer.is_global_zero:
            self.marker.write_text(str(trainer.global_step))
        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline and not (self.until == "signal" and requeue.requested):
            time.sleep(0.2)


def job_env() -> dict[str, str]:
    """What the jobs inherit (sbatch exports the submitting environment)."""
    return {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
            "PYTHONPATH": os.pathsep.join([str(REPO), str(TESTS), str(HERE)])}


def training_overrides(data: dict, run_dir: Path, extra: list[str] = ()) -> list[str]:
    return ["model=tiny", "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2", "trainer.precision=32-true",
            "logger=[csv]", "trainer.enable_progress_bar=false", "trainer.log_every_n_steps=1",
            "data=audio", f"data.metadata={data['metadata']}", f"data.cache_dir={data['cache']}",
            "data.max_duration=3.0", "data.progress=false", "+data.global_batch_size=4",
            f"trainer.max_steps={MAX_STEPS}", "callbacks.model_checkpoint.every_n_train_steps=1",
            'callbacks.validation_audio.prompts=[{prompt: "short test loop", lyrics: "[instrumental]", seed: 1}]',
            "+callbacks.validation_audio.overrides.duration=2", "callbacks.validation_audio.every_n_steps=0",
            f"hydra.run.dir={run_dir}", *extra]


def submit(cluster: LocalSlurmCluster, overrides: list[str], cwd: Path) -> int:
    """``python -m acestep_train.launch.submit <overrides>`` against the local cluster; returns the job id."""
    cwd.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run([sys.executable, "-m", "acestep_train.launch.submit", *overrides], cwd=cwd, capture_output=True,
                          text=True, env={**cluster.env, **job_env()}, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return int(re.search(r"submitted job (\d+)", proc.stdout).group(1))


def wait_for_file(path: Path, cluster: LocalSlurmCluster, job_id: int, timeout: float = JOB_TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        info = cluster.job_info(job_id)
        assert info.get("JobState") in ("PENDING", "RUNNING", "CONFIGURING"), f"{info}\n{job_log(info)}"
        assert time.monotonic() < deadline, f"no {path} after {timeout}s: {info}\n{job_log(info)}"
        time.sleep(0.5)


def job_log(info: dict) -> str:
    out = Path(info.get("StdOut", ""))
    return out.read_text(errors="replace")[-8000:] if out.is_file() else "(no job output)"


def checkpoint(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def assert_finished(cluster, job_id: int, run_dir: Path, restarts: int) -> tuple[dict, str]:
    info = cluster.wait_for_job(job_id, JOB_TIMEOUT)
    log = Path(info["StdOut"]).read_text(errors="replace")
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", f"{info}\n{log[-8000:]}"
    assert info["Restarts"] == str(restarts), f"{info}\n{log[-8000:]}"
    last = checkpoint(run_dir / "checkpoints" / "last.ckpt")
    assert last["global_step"] == MAX_STEPS
    wavs = sorted((run_dir / "validation_audio").rglob("*.wav"))
    assert wavs and all(w.with_suffix(".png").is_file() for w in wavs)
    assert wavs[-1].parent.name == f"step_{MAX_STEPS:06d}"
    return last["state_dict"], log


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys() and a
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert worst == 0.0, f"the resumed job's weights differ from the uninterrupted job's by up to {worst:.3g}"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    with LocalSlurmCluster(tmp_path_factory.mktemp("slurm")) as c:
        yield c


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from datamodules.demo import make_demo_dataset

    root = tmp_path_factory.mktemp("slurm_data")
    return {"metadata": make_demo_dataset(root / "songs", n=6, seconds=3.0, seed=0), "cache": root / "cache"}


@pytest.fixture(scope="module")
def uninterrupted(cluster, data, tmp_path_factory):
    """The reference: the 2-task DDP job run straight through (it also builds the shared feature cache)."""
    root = tmp_path_factory.mktemp("straight")
    run_dir = root / "run"
    t0 = time.monotonic()
    job_id = submit(cluster, training_overrides(data, run_dir), root / "cwd")
    weights, log = assert_finished(cluster, job_id, run_dir, restarts=0)
    print(f"\nuninterrupted 2-task job: {time.monotonic() - t0:.0f}s")
    return {"run_dir": run_dir, "weights": weights, "log": log, "job_id": job_id}


def test_ddp_job_completes(uninterrupted):
    run_dir = uninterrupted["run_dir"]
    script = (run_dir / "slurm.sbatch").read_text()
    assert "#SBATCH --ntasks-per-node=2" in script and "--gpus-per-node" not in script
    assert (run_dir / "exports" / "lora.safetensors").is_file()
    wavs = sorted(p.parent.name for p in (run_dir / "validation_audio").rglob("*.wav"))
    assert wavs == ["step_000000", f"step_{MAX_STEPS:06d}"]
    assert "All distributed processes registered. Starting with 2 processes" in uninterrupted["log"]
    assert not list(run_dir.glob("hpc_ckpt_*.ckpt"))


def test_requeued_job_resumes_from_last_checkpoint(cluster, data, uninterrupted, tmp_path):
    """Killed by ``scontrol requeue`` after step 2 (its last.ckpt holds step 1): the restart resumes from it."""
    run_dir, held = tmp_path / "run", tmp_path / "held"
    hold = ["+callbacks.hold._target_=test_slurm_training.HoldAt", f"+callbacks.hold.step={HOLD_STEP}",
            f"+callbacks.hold.marker={held}"]
    job_id = submit(cluster, training_overrides(data, run_dir, hold), tmp_path / "cwd")
    wait_for_file(held, cluster, job_id)
    saved = checkpoint(run_dir / "checkpoints" / "last.ckpt")["global_step"]
    assert 1 <= saved < MAX_STEPS
    t0 = time.monotonic()
    cluster.run("scontrol", "requeue", str(job_id))
    weights, log = assert_finished(cluster, job_id, run_dir, restarts=1)
    print(f"\nrequeue -> completed in {time.monotonic() - t0:.0f}s")
    assert f"Restoring states from the checkpoint path at {run_dir / 'checkpoints' / 'last.ckpt'}" in log
    assert not list(run_dir.glob("hpc_ckpt_*.ckpt"))
    assert_same_weights(weights, uninterrupted["weights"])


def test_warning_signal_checkpoints_and_requeues(cluster, data, uninterrupted, tmp_path):
    """SIGUSR1 (SLURM's time-limit warning) at step 2: hpc_ckpt_1.ckpt at that step, a self-requeue, and a restart
    that resumes from it."""
    run_dir, held = tmp_path / "run", tmp_path / "held"
    hold = ["+callbacks.hold._target_=test_slurm_training.HoldAt", f"+callbacks.hold.step={HOLD_STEP}",
            f"+callbacks.hold.marker={held}", "+callbacks.hold.until=signal"]
    job_id = submit(cluster, training_overrides(data, run_dir, hold), tmp_path / "cwd")
    wait_for_file(held, cluster, job_id)
    t0 = time.monotonic()
    cluster.run("scancel", "--signal=USR1", str(job_id))
    weights, log = assert_finished(cluster, job_id, run_dir, restarts=1)
    print(f"\nSIGUSR1 -> completed in {time.monotonic() - t0:.0f}s")
    hpc = run_dir / "hpc_ckpt_1.ckpt"
    assert sorted(run_dir.glob("hpc_ckpt_*.ckpt")) == [hpc]
    assert checkpoint(hpc)["global_step"] == HOLD_STEP
    assert "requeued SLURM job" in log
    assert f"Restoring states from the checkpoint path at {hpc}" in log
    assert_same_weights(weights, uninterrupted["weights"])
