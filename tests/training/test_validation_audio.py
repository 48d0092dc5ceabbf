"""The validation callback renders through the generate sampler and its wav + PNG files reach wandb (offline) and
TensorBoard."""

import json

import pytest

from datamodules.demo import make_demo_dataset
from train_helpers import run_train, tiny_overrides


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    return {"metadata": make_demo_dataset(root / "songs", n=4, seconds=2.0, seed=3), "cache": root / "cache"}


def test_validation_audio_reaches_wandb_and_tensorboard(data, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    prompt = "{prompt: 'short test loop', lyrics: '[Instrumental]', duration: 2, seed: 7, bpm: 100}"
    overrides = [o for o in tiny_overrides(data, ["trainer.max_steps=2", "exports=[]"])
                 if o not in ("logger=[csv]", "callbacks.validation_audio=null")]
    overrides += ["logger=[csv,tensorboard,wandb]", "callbacks.validation_audio.every_n_steps=1",
                  f"callbacks.validation_audio.prompts=[{prompt}]"]
    run_train(tmp_path, overrides)

    steps = sorted(p.name for p in (tmp_path / "validation_audio").iterdir())
    assert steps == ["step_000000", "step_000001", "step_000002"]  # at start, every step (the end is step 2)
    for step in steps:
        names = sorted(p.suffix for p in (tmp_path / "validation_audio" / step).iterdir())
        assert names == [".json", ".png", ".wav"], step
    sidecar = json.loads(next((tmp_path / "validation_audio" / "step_000002").glob("*.json")).read_text())
    assert sidecar["step"] == 2 and sidecar["seed"] == 7

    # wandb offline run directory: the audio and the spectrogram as media files.
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    media = runs[0] / "files" / "media"
    assert len(list((media / "audio").rglob("*.wav"))) == 3
    assert len(list((media / "images").rglob("*.png"))) == 3

    # TensorBoard event files: audio and image summaries under the callback's tags, one per render.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tmp_path / "tensorboard"), size_guidance={"audio": 0, "images": 0})
    acc.Reload()
    assert "validation_audio/00" in acc.Tags()["audio"]
    assert "validation_spectrogram/00" in acc.Tags()["images"]
    assert sorted(e.step for e in acc.Audio("validation_audio/00")) == [0, 1, 2]
    assert sorted(e.step for e in acc.Images("validation_spectrogram/00")) == [0, 1, 2]
