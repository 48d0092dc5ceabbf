"""Run a training command as a subprocess, SIGKILL it at planned points, resume from ``last.ckpt`` until it
finishes (used by ``test_kill_resume.py``).

A kill plan is a list of events, drawn from a seeded RNG so that a failure reproduces:
  * ``("time", s)``: ``s`` seconds after the process started (often during model load or the cache build);
  * ``("step", n, delay)``: ``delay`` seconds after the checkpoint of optimizer step ``n`` appeared (so the next
    step, or the ``last.ckpt`` write that follows it, is in progress);
  * ``("write", k)``: inside the segment's ``k``-th checkpoint write (``die_in_checkpoint_write.py``).
Each segment resumes from ``<run>/checkpoints/last.ckpt`` if one exists, else starts over, in the same run folder
(like a requeued job). After the plan, a final segment runs to the end.
"""

from __future__ import annotations

import os
import random
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from user_env import user_env

REPO = Path(__file__).resolve().parents[2]
DIE_IN_WRITE = Path(__file__).resolve().with_name("die_in_checkpoint_write.py")
STEP_FILE = re.compile(r"step_(\d+)\.ckpt$")


def env(tmp: Path, die_at_write: int = 0) -> dict[str, str]:
    return user_env(tmp, ACESTEP_TEST_DIE_AT_WRITE=str(die_at_write))


def kill_plan(seed: int, max_step: int) -> list[tuple]:
    """Six kills: one timed, three after random steps, two inside checkpoint writes (interleaved)."""
    rng = random.Random(seed)
    steps = sorted(rng.sample(range(2, max_step - 1), 3))
    return [("time", round(rng.uniform(0.5, 8.0), 2)),
            ("step", steps[0], round(rng.uniform(0.0, 0.3), 3)),
            ("write", rng.randint(1, 3)),
            ("step", steps[1], round(rng.uniform(0.0, 0.3), 3)),
            ("write", rng.randint(2, 4)),
            ("step", steps[2], round(rng.uniform(0.0, 0.3), 3))]


@dataclass
class Segment:
    event: tuple
    resumed_from: int | None  # global step of the checkpoint it resumed from (None: fresh start)
    returncode: int
    killed: bool
    log: str


@dataclass
class Chain:
    run_dir: Path
    segments: list[Segment] = field(default_factory=list)

    def describe(self) -> str:
        return "\n".join(f"{s.event} resumed_from={s.resumed_from} rc={s.returncode} killed={s.killed}"
                         for s in self.segments)


def last_ckpt(run_dir: Path) -> Path:
    return run_dir / "checkpoints" / "last.ckpt"


def ckpt_step(path: Path) -> int | None:
    if not path.is_file():
        return None
    return int(torch.load(path, map_location="cpu", weights_only=True)["global_step"])


def newest_step_file(run_dir: Path) -> int:
    folder = run_dir / "checkpoints"
    if not folder.is_dir():
        return -1
    steps = [int(m.group(1)) for p in folder.iterdir() if (m := STEP_FILE.search(p.name))]
    return max(steps, default=-1)


def run_segment(overrides: list[str], run_dir: Path, tmp: Path, event: tuple | None, timeout: float) -> Segment:
    """One process; SIGKILLed when ``event`` fires, else left to finish."""
    resume = last_ckpt(run_dir)
    # A step-file check must not fire on a checkpoint an earlier segment already wrote.
    resumed_from = None
    args = [*overrides, f"hydra.run.dir={run_dir}"]
    if resume.is_file():
        args.append(f"ckpt_path={resume}")
        resumed_from = newest_step_file(run_dir)
    die_at = event[1] if event and event[0] == "write" else 0
    log_path = run_dir.parent / f"segment-{time.monotonic_ns()}.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, str(DIE_IN_WRITE), *args], env=env(tmp, die_at), stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
        killed = _wait_and_kill(proc, event, run_dir, timeout)
    return Segment(event, resumed_from, proc.returncode, killed or proc.returncode == -signal.SIGKILL,
                   log_path.read_text(errors="replace"))


def _wait_and_kill(proc: subprocess.Popen, event: tuple | None, run_dir: Path, timeout: float) -> bool:
    start = time.monotonic()
    fire_at = None
    while proc.poll() is None:
        now = time.monotonic()
        if now - start > timeout:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            raise TimeoutError(f"segment {event} ran past {timeout} s")
        if event and event[0] == "time" and now - start >= event[1]:
            fire_at = now
        elif event and event[0] == "step" and fire_at is None and newest_step_file(run_dir) >= event[1]:
            fire_at = now + event[2]
        if fire_at is not None and now >= fire_at:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            return True
        time.sleep(0.002)
    return False


def run_chain(overrides: list[str], run_dir: Path, tmp: Path, plan: list[tuple], timeout: float = 900) -> Chain:
    chain = Chain(run_dir)
    for event in plan:
        if event[0] == "step" and newest_step_file(run_dir) >= event[1]:
            continue  # an earlier segment already got past this step (the plan is drawn, not tuned)
        segment = run_segment(overrides, run_dir, tmp, event, timeout)
        chain.segments.append(segment)
        if segment.returncode == 0 or not segment.killed:
            return chain  # finished before the event fired, or failed by itself (the caller reports its log)
    chain.segments.append(run_segment(overrides, run_dir, tmp, None, timeout))
    return chain


def assert_same_tree(a, b, where: str = "") -> None:
    """Nested dicts/lists/tuples of tensors and plain values, compared exactly (tensors bit for bit)."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape, where
        assert torch.equal(a, b), f"{where}: tensors differ"
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), f"{where}: keys {sorted(a)} != {sorted(b)}"
        for k in a:
            assert_same_tree(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), f"{where}: lengths differ"
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same_tree(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def export_files(run_dir: Path) -> dict[str, object]:
    """What an export holds: for a safetensors file its metadata and tensors (compared bit for bit), else its bytes.

    Not the safetensors file's bytes: the format writes its metadata map in the writing process's hash order, so
    two exports of the same tensors and metadata can differ in header byte order between processes.
    """
    from safetensors import safe_open

    root = run_dir / "exports"
    out: dict[str, object] = {}
    for p in sorted(root.rglob("*")):
        if not p.is_file():
            continue
        if p.suffix == ".safetensors":
            with safe_open(str(p), framework="pt") as f:
                out[str(p.relative_to(root))] = (f.metadata(), {k: f.get_tensor(k) for k in sorted(f.keys())})
        else:
            out[str(p.relative_to(root))] = p.read_bytes()
    return out


def describe_difference(a: Path, b: Path) -> str:
    """Which metadata entries / tensors of two safetensors files differ (for the failure message)."""
    from safetensors import safe_open

    if a.suffix != ".safetensors":
        return f"{a.name}: {a.read_bytes()[:300]!r} != {b.read_bytes()[:300]!r}"
    with safe_open(str(a), framework="pt") as fa, safe_open(str(b), framework="pt") as fb:
        ma, mb = fa.metadata() or {}, fb.metadata() or {}
        lines = [f"{a.name} metadata {k}: {ma.get(k)!r} != {mb.get(k)!r}" for k in sorted(set(ma) | set(mb))
                 if ma.get(k) != mb.get(k)]
        keys = sorted(set(fa.keys()) | set(fb.keys()))
        lines += [f"{a.name} tensor {k} differs" for k in keys
                  if k not in fa.keys() or k not in fb.keys() or not torch.equal(fa.get_tensor(k), fb.get_tensor(k))]
    return "\n".join(lines) or f"{a.name}: same metadata and tensors, different bytes (header order?)"
