"""Data-parallel training on CPU (gloo): 2-process DDP == 1 process with the whole global batch; the feature cache is
built once by both ranks together; run outputs come from rank 0 only; FSDP / DeepSpeed say clearly that they need a
GPU.

The DDP runs are real ``python -m acestep_train ... trainer=ddp trainer.accelerator=cpu trainer.devices=2`` processes;
Lightning starts the second rank with its subprocess launcher (same command line, same Hydra run dir).

Why DDP can equal one process here (what ``acestep_train.training.module`` does for it):
  - data: ``BucketBatchSampler`` cuts the same global batches for any world size and deals item k of each to rank
    ``k % world_size``, so the two ranks together train exactly the single process's batch (``+data.global_batch_size``
    keeps the global batch fixed while the per-device batch halves);
  - draws: t, noise and condition dropout come from one RNG per *sample*, keyed on (seed, step, the sample's position
    in the global batch), not one RNG per rank;
  - loss: the masked MSE is normalised by the valid frames of the *global* batch (one all-reduce of the frame count),
    so the rank-averaged gradient is the single-process gradient even though the clips here have different lengths
    and the ranks hold different numbers of frames (checked below);
  - gradient clipping acts on the averaged gradient, AdamW then does the same update.
Not equal by construction: dropout inside the model (LoRA dropout, 0 by default) draws per rank over local shapes.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch

from train_helpers import FakeTrainer as _FakeTrainer

REPO = Path(__file__).resolve().parents[2]
TESTS = Path(__file__).resolve().parents[1]
HERE = Path(__file__).resolve().parent  # the probe callbacks below are imported by name in the training processes
CLIP_SECONDS = [1.5, 2.0, 2.3, 2.6, 2.8, 3.0]  # different lengths: ranks get different frame counts


def subprocess_env() -> dict[str, str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": os.pathsep.join([str(REPO), str(TESTS), str(HERE), os.environ.get("PYTHONPATH", "")]),
           "PYTHONUNBUFFERED": "1", "HYDRA_FULL_ERROR": "1"}
    for key in [k for k in env if k.startswith(("SLURM_", "SBATCH_", "SRUN_"))]:
        del env[key]  # never inherit an allocation: Lightning would take the SLURM path
    return env


def run_cli(run_dir: Path, overrides: list[str], timeout: float = 900) -> subprocess.CompletedProcess:
    """``python -m acestep_train <overrides> hydra.run.dir=<run_dir>``, in a scratch working directory."""
    cwd = run_dir.parent / f"{run_dir.name}.cwd"
    cwd.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "acestep_train", *overrides, f"hydra.run.dir={run_dir}"]
    return subprocess.run(cmd, cwd=cwd, env=subprocess_env(), capture_output=True, text=True, timeout=timeout)


def make_uneven_dataset(root: Path, seconds=CLIP_SECONDS) -> Path:
    """One demo clip per length in ``seconds`` under ``root``, with one metadata.csv listing them all."""
    from datamodules.demo import make_demo_dataset

    rows, header = [], None
    for i, s in enumerate(seconds):
        meta = make_demo_dataset(root / f"part{i}", n=1, seconds=s, seed=i)
        with meta.open(newline="") as f:
            reader = csv.reader(f)
            header = next(reader)
            for row in reader:
                row[0] = f"part{i}/{row[0]}"
                rows.append(row)
    path = root / "metadata.csv"
    with path.open("w", newline="") as f:
        csv.writer(f).writerows([header, *rows])
    return path


def tiny_cli_overrides(metadata: Path, cache: Path, extra: list[str] = ()) -> list[str]:
    return ["model=tiny", "logger=[csv]", "trainer.enable_progress_bar=false", "trainer.log_every_n_steps=1",
            "data=audio", f"data.metadata={metadata}", f"data.cache_dir={cache}", "data.max_duration=3.0",
            "data.progress=false", "+data.global_batch_size=4", "trainer.max_steps=3",
            "callbacks.model_checkpoint.every_n_train_steps=1", *extra]


DDP_CPU = ["trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2", "trainer.precision=32-true"]
ONE_CPU = ["trainer=cpu"]
# One short prompt at 2 s (the tiny model renders it in a moment).
VALIDATION_AUDIO = ['callbacks.validation_audio.prompts=[{prompt: "short test loop", lyrics: "[instrumental]", '
                    'duration: 2, seed: 1}]', "callbacks.validation_audio.every_n_steps=0"]


def metric(run_dir: Path, name: str) -> list[float]:
    rows = list(csv.DictReader(open(run_dir / "csv" / "metrics.csv")))
    return [float(r[name]) for r in rows if r.get(name)]


def trained(run_dir: Path) -> dict[str, torch.Tensor]:
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == 3
    return ckpt["state_dict"]


# ---- a probe loaded into the training processes (+callbacks.probe._target_=test_distributed.WriteProbe) ---------
def _rank() -> int:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank()
    return int(os.environ.get("SLURM_PROCID", os.environ.get("LOCAL_RANK", "0")))


class WriteProbe(L.Callback):
    """Records, per process, which rank wrote each cache item, validation-audio file, checkpoint, metrics row,
    run record and export: wraps the writers when the callback is built (before the data module's setup)."""

    def __init__(self, out: str):
        import datamodules.cache as cache
        import lightning.fabric.loggers.csv_logs as csv_logs

        import acestep_train.training.callbacks.validation_audio as va
        import acestep_train.training.export as export
        import acestep_train.training.train as train
        import acestep_train.training.callbacks.run_record as run_record
        from acestep_train.training.atomic_checkpoint import AtomicCheckpointIO

        self.file = Path(out) / f"writes-{os.getpid()}.jsonl"
        self.file.parent.mkdir(parents=True, exist_ok=True)
        self._wrap(cache, "_save_atomic", "cache", lambda a: a[0])
        self._wrap(va, "write_audio", "audio", lambda a: a[0])
        self._wrap(va, "save_spectrogram_png", "audio", lambda a: a[0])
        self._wrap(export, "export_module", "export", lambda a: a[1])
        self._wrap(train, "export_module", "export", lambda a: a[1])  # the training job calls its own import
        self._wrap(run_record, "write_run_record", "run_record", lambda a: a[0])
        self._wrap(AtomicCheckpointIO, "save_checkpoint", "checkpoint", lambda a: a[2])
        self._wrap(csv_logs._ExperimentWriter, "log_metrics", "metrics", lambda a: a[0].log_dir)

    def _wrap(self, owner, name: str, kind: str, path_of) -> None:
        original = getattr(owner, name)
        file = self.file

        def wrapper(*args, **kwargs):
            with file.open("a") as f:
                f.write(json.dumps({"rank": _rank(), "pid": os.getpid(), "kind": kind,
                                    "path": str(path_of(args))}) + "\n")
            return original(*args, **kwargs)

        setattr(owner, name, wrapper)


def probe_records(out: Path) -> list[dict]:
    return [json.loads(line) for f in sorted(out.glob("writes-*.jsonl")) for line in f.read_text().splitlines()]


def rank_frame_counts(cache: Path, world: int = 2, per_rank: int = 2, seed: int = 42) -> list[list[int]]:
    """Valid frames per rank at each step of epoch 0, as the data module deals them."""
    from datamodules.dataset import CachedDataset
    from datamodules.sampler import BucketBatchSampler

    (manifest,) = cache.glob("manifest-*.json")
    lengths = CachedDataset(manifest).n_frames
    steps = []
    for rank in range(world):
        sampler = BucketBatchSampler(lengths, per_rank, seed=seed, rank=rank, world_size=world)
        steps.append([sum(lengths[i] for i in batch) for batch in sampler])
    return [list(s) for s in zip(*steps)]


# ---------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def uneven(tmp_path_factory):
    root = tmp_path_factory.mktemp("uneven")
    return {"metadata": make_uneven_dataset(root / "songs"), "cache": root / "cache"}


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["lora", "full"])
def test_ddp_two_processes_equal_one_process(uneven, tmp_path, mode):
    """2 ranks x 2 samples == 1 process x 4 samples: same final weights (fp32 tolerance) and the same logged
    loss, with clips of different lengths. The first run (DDP, lora) also builds the shared cache; see
    test_ddp_run_shares_the_cache_and_writes_from_rank_zero for who writes what."""
    common = tiny_cli_overrides(uneven["metadata"], uneven["cache"], [f"mode={mode}", "callbacks.validation_audio=null",
                                                                      "exports=[]"])
    ddp, one = tmp_path / "ddp", tmp_path / "one"
    proc = run_cli(ddp, [*common, *DDP_CPU])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    proc = run_cli(one, [*common, *ONE_CPU])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]

    # The test exercises the global-frame normalisation: ranks hold different frame counts at some step.
    frames = rank_frame_counts(uneven["cache"])
    assert any(len(set(step)) > 1 for step in frames), frames

    a, b = trained(ddp), trained(one)
    assert a.keys() == b.keys() and a
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert worst <= 1e-6, f"DDP and single-process weights differ by up to {worst:.3g}"
    if mode == "lora":  # B starts at zero: it must have moved for the comparison to mean anything
        assert any(k.endswith("lora_B.default.weight") and a[k].abs().max() > 1e-4 for k in a)
    torch.testing.assert_close(torch.tensor(metric(ddp, "train/loss")), torch.tensor(metric(one, "train/loss")),
                               rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_ddp_run_shares_the_cache_and_writes_from_rank_zero(tmp_path):
    """Both ranks encode (each item once, half each); validation audio, checkpoints, metrics, the run record and the
    exports come from rank 0 only."""
    songs = make_uneven_dataset(tmp_path / "songs", CLIP_SECONDS[:4])
    cache, run_dir, probe = tmp_path / "cache", tmp_path / "run", tmp_path / "probe"
    overrides = tiny_cli_overrides(songs, cache, [*DDP_CPU, *VALIDATION_AUDIO, "trainer.max_steps=2",
                                                  "+callbacks.probe._target_=test_distributed.WriteProbe",
                                                  f"+callbacks.probe.out={probe}"])
    proc = run_cli(run_dir, overrides)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    records = probe_records(probe)
    assert {r["rank"] for r in records} == {0, 1} and len({r["pid"] for r in records}) == 2, records

    cache_writes = [r for r in records if r["kind"] == "cache"]
    items = sorted(str(p) for p in (cache / "items").glob("*.safetensors"))
    assert sorted(r["path"] for r in cache_writes) == items and len(items) == 4  # every item file, each once
    assert sorted(r["rank"] for r in cache_writes) == [0, 0, 1, 1]  # the work is shared
    assert len(list(cache.glob("manifest-*.json"))) == 1

    for kind in ("audio", "checkpoint", "metrics", "run_record", "export"):
        writers = {r["rank"] for r in records if r["kind"] == kind}
        assert writers == {0}, f"{kind} written by ranks {writers}"
    wavs = sorted((run_dir / "validation_audio").rglob("*.wav"))
    pngs = sorted((run_dir / "validation_audio").rglob("*.png"))
    assert [p.parent.name for p in wavs] == ["step_000000", "step_000002"] and len(pngs) == 2
    assert (run_dir / "exports" / "lora.safetensors").is_file()
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
    assert (run_dir / "run.json").is_file() and (run_dir / "csv" / "metrics.csv").is_file()
    # a second run on the same cache encodes nothing
    proc = run_cli(tmp_path / "again", [*overrides[:-1], f"+callbacks.probe.out={tmp_path / 'probe2'}",
                                        "callbacks.validation_audio=null", "exports=[]", "trainer.max_steps=1"])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    assert not [r for r in probe_records(tmp_path / "probe2") if r["kind"] == "cache"]


# ---- sharded strategies --------------------------------------------------------------------------------------
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown on a machine without a GPU")
@pytest.mark.parametrize("trainer,name", [("fsdp", "fsdp"), ("deepspeed_zero3", "deepspeed")])
def test_sharded_strategy_without_gpu_says_so(tmp_path, trainer, name):
    proc = run_cli(tmp_path / "run", [f"trainer={trainer}"], timeout=300)
    assert proc.returncode != 0
    err = proc.stderr
    assert f"strategy {name} needs a CUDA GPU; this machine has none" in err, err[-3000:]
    assert "use trainer=cpu or trainer=ddp with accelerator=cpu" in err
    assert not (tmp_path / "run" / "demo_data").exists()  # stopped before any data or model work


@pytest.mark.parametrize("trainer,extra", [("fsdp", []), ("fsdp", ["model=xl-sft", "model.dtype=float32"]),
                                           ("deepspeed_zero2", ["model=xl-sft"]), ("deepspeed_zero3", ["model=xl-sft"])])
def test_sharded_strategy_configs_pass_startup_checks_with_a_gpu(tmp_path, monkeypatch, trainer, extra):
    """With a (pretended) GPU the composed configs pass the startup checks, and the strategy builds."""
    import importlib.util

    from hydra.utils import instantiate
    from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy

    from acestep_train.training import train
    from acestep_train.training.checks import StartupCheckError
    from train_helpers import compose_train

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    cfg = compose_train(tmp_path, [f"trainer={trainer}", *extra])
    assert cfg.trainer.accelerator == "gpu" and cfg.trainer.precision == "bf16-mixed"
    assert cfg.trainer.use_distributed_sampler is False
    deepspeed = trainer.startswith("deepspeed")
    if deepspeed and importlib.util.find_spec("deepspeed") is None:
        with pytest.raises(StartupCheckError, match=r"strategy deepspeed needs the deepspeed package.*pip install"):
            train.run_startup_checks(cfg)
        return
    train.run_startup_checks(cfg)
    strategy = instantiate(cfg.trainer.strategy)
    if deepspeed:
        assert isinstance(strategy, DeepSpeedStrategy)
        assert strategy.config["zero_optimization"]["stage"] == int(trainer[-1])
    else:
        assert isinstance(strategy, FSDPStrategy)
        assert strategy.kwargs["use_orig_params"] is True and strategy.sharding_strategy.name == "FULL_SHARD"


@pytest.mark.parametrize("mode", ["lora", "full"])
def test_fsdp_refuses_a_bf16_base_under_mixed_precision(tmp_path, monkeypatch, mode):
    """FSDP flattens a DiT layer into one tensor of one dtype; bf16 base + fp32 adapters (or fp32 DiT + bf16
    encoder) cannot be flattened, which would fail only once the model is wrapped on the GPUs."""
    from acestep_train.training import train
    from acestep_train.training.checks import StartupCheckError
    from train_helpers import compose_train

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    cfg = compose_train(tmp_path, ["trainer=fsdp", "model=xl-sft", f"mode={mode}"])
    with pytest.raises(StartupCheckError, match=r"strategy fsdp with model.dtype=bfloat16 .* set model.dtype=float32"):
        train.run_startup_checks(cfg)
    train.run_startup_checks(compose_train(tmp_path, ["trainer=fsdp", "model=xl-sft", f"mode={mode}",
                                                      "trainer.precision=bf16-true"]))
    if mode == "lora":
        cfg = compose_train(tmp_path, ["trainer=fsdp", "model=xl-sft", "model.dtype=float32", "mode=lora",
                                       "mode.frozen_fp8=true"])
        with pytest.raises(StartupCheckError, match=r"strategy fsdp with mode.frozen_fp8=true"):
            train.run_startup_checks(cfg)


def test_global_batch_must_split_over_ranks(tmp_path):
    from acestep_train.training import train
    from acestep_train.training.checks import StartupCheckError
    from train_helpers import compose_train

    cfg = compose_train(tmp_path, [*DDP_CPU, "trainer.devices=4", "+data.global_batch_size=6"])
    with pytest.raises(StartupCheckError, match="global batch size 6 does not divide by the world size 4"):
        train.run_startup_checks(cfg)


# ---- resume and requeue plumbing (unit level; tests/test_slurm_training.py runs them in real SLURM jobs) -------------
def test_resolve_ckpt_path(tmp_path):
    import time

    from acestep_train.training.strategies import resolve_ckpt_path

    assert resolve_ckpt_path(None, tmp_path, on_slurm=False) is None
    assert resolve_ckpt_path("/x/y.ckpt", tmp_path, on_slurm=True) == "/x/y.ckpt"
    assert resolve_ckpt_path("auto", tmp_path, on_slurm=False) is None  # nothing yet: a fresh start
    last = tmp_path / "checkpoints" / "last.ckpt"
    last.parent.mkdir()
    last.write_bytes(b"")
    assert resolve_ckpt_path("auto", tmp_path, on_slurm=False) == str(last)
    assert resolve_ckpt_path(None, tmp_path, on_slurm=False) is None  # outside SLURM null stays null
    assert resolve_ckpt_path(None, tmp_path, on_slurm=True) == str(last)  # a requeued SLURM job resumes itself
    time.sleep(0.01)
    hpc = tmp_path / "hpc_ckpt_1.ckpt"
    hpc.write_bytes(b"")
    assert resolve_ckpt_path("auto", tmp_path, on_slurm=False) == str(hpc)  # the newest wins
    time.sleep(0.01)
    last.write_bytes(b"")
    assert resolve_ckpt_path("auto", tmp_path, on_slurm=False) == str(last)  # a stale hpc checkpoint does not
    other = tmp_path / "elsewhere"
    other.mkdir()
    (other / "last.ckpt").write_bytes(b"")
    assert resolve_ckpt_path("auto", tmp_path, checkpoint_dir=other) == str(other / "last.ckpt")


def test_slurm_requeue_callback(tmp_path, monkeypatch):
    import signal

    from acestep_train.training import strategies
    from acestep_train.training.strategies import SlurmRequeue, StoppedBySignal

    previous = signal.getsignal(signal.SIGUSR1)
    monkeypatch.delenv("SLURM_NTASKS", raising=False)
    cb = SlurmRequeue()
    assert not cb.on_slurm  # outside SLURM the warning signal checkpoints and exits instead (tests/training/test_signals)
    cb.restore()
    monkeypatch.setenv("SLURM_NTASKS", "2")
    monkeypatch.setenv("SLURM_JOB_NAME", "interactive")
    cb = SlurmRequeue()
    assert not cb.on_slurm  # salloc: Lightning ignores SLURM, and so do we
    cb.restore()

    monkeypatch.setenv("SLURM_JOB_NAME", "train")
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    calls = []

    def scontrol(cmd, **kw):
        calls.append(cmd)
        return subprocess.CompletedProcess(cmd, 1, stdout="", stderr="Requeue not permitted")

    monkeypatch.setattr(strategies.subprocess, "run", scontrol)
    cb = SlurmRequeue(wait_s=0)
    assert cb.on_slurm
    try:
        trainer = _FakeTrainer(tmp_path)
        os.kill(os.getpid(), signal.SIGUSR1)  # before training (model loading, caching): kept, not fatal
        assert cb.requested
        cb.received = None
        cb.on_train_start(trainer, None)
        cb.on_train_batch_end(trainer)
        assert trainer.saved == [] and calls == []  # no signal, nothing happens
        os.kill(os.getpid(), signal.SIGUSR1)  # the handler only sets a flag
        assert cb.requested
        cb.on_train_batch_end(trainer)
        assert trainer.saved == [] and cb.requested  # no optimizer step since (gradient accumulation): wait for one
        trainer.global_step = 6
        cb.on_train_batch_end(trainer)  # requeue refused: checkpoint kept, training goes on
        assert trainer.saved == [str(tmp_path / "hpc_ckpt_1.ckpt")] and calls == [["scontrol", "requeue", "77"]]
        assert not cb.requested
        monkeypatch.setattr(strategies.subprocess, "run",
                            lambda cmd, **kw: subprocess.CompletedProcess(cmd, 0, stdout="", stderr=""))
        os.kill(os.getpid(), signal.SIGUSR1)
        trainer.global_step = 7
        with pytest.raises(RuntimeError, match="requeued, but SLURM did not stop it"):
            cb.on_train_batch_end(trainer)  # requeued: waits for SLURM's kill (wait_s=0 here)
        assert trainer.saved[-1] == str(tmp_path / "hpc_ckpt_2.ckpt")
        os.kill(os.getpid(), signal.SIGTERM)  # inside SLURM, SIGTERM is a stop: last.ckpt and exit 143
        trainer.global_step = 8
        with pytest.raises(StoppedBySignal) as stopped:
            cb.on_train_batch_end(trainer)
        assert stopped.value.code == 143 and trainer.saved[-1] == str(tmp_path / "checkpoints" / "last.ckpt")
    finally:
        cb.restore()
    assert signal.getsignal(signal.SIGUSR1) == previous
