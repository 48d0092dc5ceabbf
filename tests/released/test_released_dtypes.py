"""Released-dtype tier: a shallow model in the released layout *and the released dtypes* goes through the user's
paths — generate, and for ``mode=lora``, ``dora`` and ``full`` one training step with validation audio, the
end-of-run exports, the export command on its ``last.ckpt``, and generating with what was exported.

Every released variant ships its DiT and condition encoder in bfloat16, its VAE in float32 and its text encoder in
bfloat16 (the released model configs say ``dtype: bfloat16`` and leave the VAE at float32); the other tests train
float32 toys, which cannot see a dtype seam. Here the toy width stays (CPU time) but the files, the folder layout
and the dtypes are those of a release, loaded through ``model.source`` like a downloaded variant.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from hydra import compose, initialize_config_dir

from acestep_train import load_model
from acestep_train.checkpoints.loading import save_released_layout
from acestep_train.checkpoints.variants import CONF_DIR
from train_helpers import run_train, tiny_overrides

SUB = "acestep-v15-turbo"
VALIDATION_PROMPT = '[{prompt: "warm synth pad", lyrics: "[instrumental]", duration: 2, seed: 1}]'


@pytest.fixture(scope="module")
def released(tmp_path_factory) -> Path:
    """A released-layout repository: DiT + condition encoder bf16, VAE fp32, text encoder bf16."""
    bundle = load_model("tiny")
    bundle.model.to(torch.bfloat16)
    bundle.text_encoder.to(torch.bfloat16)
    bundle.vae.to(torch.float32)
    root = save_released_layout(bundle, tmp_path_factory.mktemp("released") / "Ace-Step1.5", SUB)
    assert _file_dtypes(root / SUB / "model.safetensors") == {"BF16"}
    assert _file_dtypes(root / "vae" / "diffusion_pytorch_model.safetensors") == {"F32"}
    te_files = list((root / "Qwen3-Embedding-0.6B").glob("*.safetensors"))
    assert te_files and all(_file_dtypes(f) == {"BF16"} for f in te_files)
    return root


def _file_dtypes(path: Path) -> set[str]:
    header_len = int.from_bytes(path.read_bytes()[:8], "little")
    header = json.loads(path.read_bytes()[8:8 + header_len])
    return {v["dtype"] for k, v in header.items() if k != "__metadata__"}


def model_overrides(repo: Path, subfolder: str = SUB, components: Path | None = None) -> list[str]:
    """``model=tiny`` (toy architecture) read from a release-shaped folder at the released dtypes. (``tiny`` has no
    ``subfolder``/``components_source`` keys, hence ``++``.)"""
    extra = [f"++model.components_source={components}"] if components else []
    return [f"model.source={repo}", f"++model.subfolder='{subfolder}'", "model.dtype=bfloat16", *extra]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from datamodules.demo import make_demo_dataset

    root = tmp_path_factory.mktemp("released-data")
    return {"metadata": make_demo_dataset(root / "songs", n=2, seconds=2.0, seed=0), "cache": root / "cache"}


def generate(model: list[str], out: Path, extra: list[str] = ()) -> Path:
    """The ``generate`` command's own code path (composed config -> run), in-process."""
    from acestep_train.inference import generate as gen

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="generate", overrides=["model=tiny", *model, "progress=false",
                                                          "prompt=bright piano", "duration=3", "seed=5",
                                                          f"out={out}", "device=cpu", *extra])
    gen.run(cfg)
    return out


def assert_audio(path: Path) -> None:
    audio, rate = sf.read(path, always_2d=True)
    assert rate == 48000 and audio.shape[1] == 2, path
    assert np.isfinite(audio).all(), f"{path}: non-finite samples"
    assert np.abs(audio).max() > 1e-4, f"{path}: silent"


def test_loads_at_the_released_dtypes(released):
    bundle = load_model("tiny", source=str(released), subfolder=SUB, dtype="bfloat16")
    assert {p.dtype for p in bundle.model.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in bundle.vae.parameters()} == {torch.float32}
    assert {p.dtype for p in bundle.text_encoder.parameters()} == {torch.bfloat16}


def test_generate(released, tmp_path):
    assert_audio(generate(model_overrides(released), tmp_path / "song.wav"))


MODES = [pytest.param("lora", id="lora"), pytest.param("dora", id="dora"),
         "full"]


@pytest.mark.parametrize("mode", MODES)
def test_one_step_validation_audio_and_exports(mode, released, data, tmp_path):
    run_dir = tmp_path / "run"
    overrides = tiny_overrides(data, [*model_overrides(released), f"mode={mode}", "trainer.max_steps=1",
                                      "mode.optimizer.lr=1e-3", "mode.scheduler=null"])
    overrides = [o for o in overrides if o != "callbacks.validation_audio=null"]
    overrides += [f"callbacks.validation_audio.prompts={VALIDATION_PROMPT}"]
    out = run_train(run_dir, overrides)

    wavs = sorted((run_dir / "validation_audio").rglob("*.wav"))
    assert [w.parent.name for w in wavs] == ["step_000000", "step_000001"], wavs
    for w in wavs:
        assert_audio(w)
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    trained = ckpt["state_dict"]
    assert trained and all(torch.isfinite(v.float()).all() for v in trained.values())

    if mode == "full":
        folder = out["exports"]["full"]
        assert _file_dtypes(folder / "model.safetensors") == {"BF16"}, "a full export must keep the released dtype"
        assert_audio(generate(model_overrides(folder, "", released), tmp_path / "full.wav"))
        return
    exported = out["exports"]
    expected = {"acestep", "peft", "comfyui", "diffsynth"} if mode == "lora" else {"acestep", "peft"}
    assert set(exported) == expected
    # The export command on the checkpoint writes the same files again.
    from acestep_train.training import export

    export.main([str(run_dir / "checkpoints" / "last.ckpt"), "--out", str(tmp_path / "re-export")])
    for fmt, path in exported.items():
        again = tmp_path / "re-export" / path.name
        assert again.exists(), fmt
    # Generating with each export on the bf16 base. (generate applies adapters as (A, B, scale) deltas, which a
    # DoRA adapter does not have; it says so and points to restore_adapter(), so DoRA stops at the export here.)
    for fmt, path in exported.items() if mode == "lora" else ():
        adapter = f"adapters=[{{path: '{path}', strength: 1.0}}]"
        assert_audio(generate(model_overrides(released), tmp_path / f"with_{fmt}.wav", [adapter]))
