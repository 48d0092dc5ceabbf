"""A NaN adapter is refused where it is loaded, naming the file and the tensor (as a training start point and in
``generate``), and ``generate`` never writes non-finite audio (one ``error:`` line, status 2)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from acestep_train.checkpoints.checkpoint_io import CheckpointError
from acestep_train.lora import save_lora_weights
from acestep_train.lora import LoraDelta
from datamodules.demo import make_demo_dataset
from train_helpers import run_train, tiny_overrides

REPO = Path(__file__).resolve().parents[2]
BAD_MODULE = "layers.1.cross_attn.o_proj"


def adapter(path: Path, fill_b: float | None = None, nan_in: str | None = None, fmt: str = "acestep") -> Path:
    """A rank-2 adapter on the tiny DiT's attention; ``nan_in`` gets NaNs in its B, ``fill_b`` sets every B."""
    g = torch.Generator().manual_seed(3)
    weights = {}
    for i in range(2):
        for attn in ("self_attn", "cross_attn"):
            for p in ("q_proj", "o_proj"):  # 64 -> 64 in the tiny DiT
                name = f"layers.{i}.{attn}.{p}"
                B = torch.randn(64, 2, generator=g) * 0.1 if fill_b is None else torch.full((64, 2), fill_b)
                if name == nan_in:
                    B[3, 1] = float("nan")
                weights[name] = LoraDelta(torch.randn(2, 64, generator=g) * 0.1, B, 2.0)
    return save_lora_weights(weights, path, fmt)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    return {"metadata": make_demo_dataset(root / "songs", n=2, seconds=2.0), "cache": root / "cache"}


@pytest.mark.parametrize("key", ["mode.init_lora", "mode.fuse_loras"])
def test_training_refuses_a_nan_start_adapter(tmp_path, data, key):
    bad = adapter(tmp_path / "bad.safetensors", nan_in=BAD_MODULE)
    value = str(bad) if key == "mode.init_lora" else f"[{{path: {bad}}}]"
    lora = ["mode.lora.rank=2", "mode.lora.alpha=4", "trainer.max_steps=1"]
    with pytest.raises(CheckpointError, match=rf"{key} adapter {bad}: .*{BAD_MODULE}.*1 of 128 values are NaN/Inf"):
        run_train(tmp_path / "run", tiny_overrides(data, [f"{key}={value}", *lora]))
    assert not (tmp_path / "run" / "checkpoints").exists()  # stopped before training, not blamed on samples
    run_train(tmp_path / "ok", tiny_overrides(data, [f"{key}={adapter(tmp_path / 'ok.safetensors')}"
                                                     if key == "mode.init_lora" else
                                                     f"{key}=[{{path: {adapter(tmp_path / 'ok.safetensors')}}}]",
                                                     *lora]))  # negative control: a finite adapter trains


def generate(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests")]), "OMP_NUM_THREADS": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    env.pop("ACESTEP_TRACEBACK", None)
    return subprocess.run([sys.executable, "-m", "acestep_train.inference.generate", "model=tiny", "progress=false",
                           "prompt=a short loop", "duration=2", "seed=1", *args], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)


def one_error(proc: subprocess.CompletedProcess) -> str:
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 2 and len(errors) == 1, f"status {proc.returncode}\n{proc.stderr[-3000:]}"
    return errors[0]


def test_generate_refuses_a_nan_adapter(tmp_path):
    bad = adapter(tmp_path / "bad.safetensors", nan_in=BAD_MODULE)
    line = one_error(generate(tmp_path, f"out={tmp_path / 'a.wav'}", f"adapters=[{bad}]"))
    assert str(bad) in line and BAD_MODULE in line and "NaN/Inf" in line
    assert not (tmp_path / "a.wav").exists()


def test_generate_never_writes_non_finite_audio(tmp_path, monkeypatch, capsys):
    """Whatever makes the audio non-finite (here: the sampler's output, poisoned), nothing is written."""
    import acestep_train.inference as inference
    from acestep_train.inference import generate as gen
    from hydra import compose, initialize_config_dir

    from acestep_train.checkpoints.variants import CONF_DIR

    real = inference.Sampler

    class PoisonedSampler(real):
        def __call__(self, *args, **kwargs):
            result = super().__call__(*args, **kwargs)
            result.audio[0, 1, 100] = float("nan")
            return result

    monkeypatch.setattr(inference, "Sampler", PoisonedSampler)
    out = tmp_path / "a.wav"
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="generate", overrides=["model=tiny", "progress=false", "prompt=a short loop",
                                                         "duration=2", "seed=1", f"out={out}"])
    with pytest.raises(SystemExit) as exited:
        gen.run_cli(cfg)
    assert exited.value.code == 2
    line = capsys.readouterr().err.strip()
    assert line == f"error: {out}: the generated audio has NaN/Inf samples (a corrupt adapter or model weights?); " \
                   "nothing was written"
    assert not list(tmp_path.glob("a.*"))
    monkeypatch.setattr(inference, "Sampler", real)
    gen.run_cli(cfg)  # negative control: the same request without the poison is written
    assert out.is_file()
