"""Every command turns bad input into one ``error: ...`` line naming the file/row/key and exit status 2, run as a
user runs it (a subprocess from an empty directory); ``ACESTEP_TRACEBACK=1`` shows the traceback instead."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def command(tmp_path: Path, module: str, *args: str, **env: str) -> subprocess.CompletedProcess:
    cwd = tmp_path / "cwd"
    cwd.mkdir(exist_ok=True)
    full_env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests")]),
                "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
                "ACESTEP_DATA_CACHE": str(tmp_path / "cache"), **env}
    if "ACESTEP_TRACEBACK" not in env:
        full_env.pop("ACESTEP_TRACEBACK", None)
    return subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, env=full_env, capture_output=True,
                          text=True, timeout=600)


def assert_one_error_line(proc: subprocess.CompletedProcess, *expected: str) -> str:
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 2 and len(errors) == 1, f"status {proc.returncode}\n{proc.stderr[-4000:]}"
    assert "Traceback" not in proc.stderr, proc.stderr[-4000:]
    for text in expected:
        assert text in errors[0], errors[0]
    return errors[0]


@pytest.fixture
def bad_row_metadata(tmp_path) -> Path:
    """A metadata file whose second data row names an audio file that does not exist."""
    from datamodules.demo import make_demo_dataset

    meta = make_demo_dataset(tmp_path / "songs", n=1, seconds=2.0)
    lines = meta.read_text().splitlines()
    lines.append(lines[1].replace(lines[1].split(",")[0], "missing.wav", 1))
    meta.write_text("\n".join(lines) + "\n")
    return meta


def test_train_bad_row(tmp_path, bad_row_metadata):
    proc = command(tmp_path, "acestep_train", f"hydra.run.dir={tmp_path / 'run'}", "data=audio",
                   f"data.metadata={bad_row_metadata}", "data.on_error=raise", "callbacks.validation_audio=null")
    assert_one_error_line(proc, f"{bad_row_metadata} row ", "missing.wav")


def test_train_bad_override(tmp_path):
    proc = command(tmp_path, "acestep_train", f"hydra.run.dir={tmp_path / 'run'}", "trainer.devices=auto")
    assert_one_error_line(proc, "trainer.devices='auto'")
    proc = command(tmp_path, "acestep_train", f"hydra.run.dir={tmp_path / 'run'}", "model=no-such-model")
    assert_one_error_line(proc, "no-such-model")


def test_traceback_on_request(tmp_path):
    proc = command(tmp_path, "acestep_train", f"hydra.run.dir={tmp_path / 'run'}", "trainer.devices=auto",
                   ACESTEP_TRACEBACK="1")
    assert proc.returncode not in (0, 2) and "Traceback" in proc.stderr and "StartupCheckError" in proc.stderr


def test_preprocess_missing_metadata(tmp_path):
    missing = tmp_path / "nowhere" / "metadata.csv"
    proc = command(tmp_path, "acestep_train.training.preprocess", f"hydra.run.dir={tmp_path / 'run'}", "data=audio",
                   f"data.metadata={missing}")
    assert_one_error_line(proc, f"{missing}: metadata file not found")


def test_preprocess_missing_mandatory_key(tmp_path):
    proc = command(tmp_path, "acestep_train.training.preprocess", f"hydra.run.dir={tmp_path / 'run'}", "data=audio")
    assert_one_error_line(proc, "data.metadata is required")


def test_export_missing_checkpoint(tmp_path):
    missing = tmp_path / "run" / "checkpoints" / "last.ckpt"
    assert_one_error_line(command(tmp_path, "acestep_train.training.export", str(missing)),
                          f"{missing}: no such checkpoint")


def test_export_checkpoint_that_is_not_plain_data(tmp_path):
    from fractions import Fraction

    import torch

    ckpt = tmp_path / "run" / "checkpoints" / "last.ckpt"
    ckpt.parent.mkdir(parents=True)
    torch.save({"state_dict": {}, "x": Fraction(1, 3)}, ckpt)  # a class weights_only loading refuses
    (tmp_path / "run" / "config.yaml").write_text("model: {}\n")
    assert_one_error_line(command(tmp_path, "acestep_train.training.export", str(ckpt)),
                          f"{ckpt}: not a training checkpoint that loads safely")


def test_generate_bad_override(tmp_path):
    proc = command(tmp_path, "acestep_train.inference.generate", "model=no-such-model", "prompt=hi", "out=a.wav")
    assert_one_error_line(proc, "no-such-model")


def test_submit_bad_value(tmp_path):
    proc = command(tmp_path, "acestep_train.launch.submit", "trainer.accelerator=auto", "--dry-run")
    assert_one_error_line(proc, "trainer.accelerator='auto'")
