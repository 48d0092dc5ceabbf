"""Hostile files: a pickle payload that would write a marker file, placed everywhere a command loads a file or
URL — the resume checkpoint (``ckpt_path``, local and ``http://``), ``silence_latent.pt`` of a model folder,
adapters (a PEFT ``adapter_model.bin``, a ``.pt``, a pickle renamed ``.safetensors``) for ``generate``,
``mode.init_lora`` and ``mode.fuse_loras``, the export command's checkpoint, and the feature-cache items. Each
command must exit non-zero with a message naming the file, and the marker must never appear.

The payload is proven live first (negative control): ``torch.load(weights_only=False)`` does write the marker.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from hostile_payloads import FileServer, hostile_checkpoint, hostile_tensor_file

from user_env import user_env

REPO = Path(__file__).resolve().parents[2]
SUB = "acestep-v15-turbo"
ATTENTION = r"layers\.\d+\.(self_attn|cross_attn)\.(q_proj|k_proj|v_proj|o_proj)"


def env(tmp: Path) -> dict[str, str]:
    return user_env(tmp)


def run(module: str, args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *map(str, args)], cwd=cwd, env=env(cwd),
                          capture_output=True, text=True, timeout=900)


def assert_refused(proc: subprocess.CompletedProcess, marker: Path, names: str) -> None:
    out = proc.stdout + proc.stderr
    assert not marker.exists(), f"the payload ran (marker written)\n{out[-3000:]}"
    assert proc.returncode != 0, f"exit 0 on a hostile file\n{out[-3000:]}"
    last = [line for line in out.strip().splitlines() if line.strip()][-1]
    assert names in out, f"the message does not name {names!r}:\n{out[-3000:]}"
    assert names in last or "error" in last.lower(), f"the last line should say what failed:\n{last}"


# ---- shared inputs -----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def songs(tmp_path_factory):
    from datamodules.demo import make_demo_dataset

    return make_demo_dataset(tmp_path_factory.mktemp("hostile-data") / "songs", n=2, seconds=1.0, seed=0)


@pytest.fixture(scope="module")
def peft_adapter(tmp_path_factory) -> Path:
    """A genuine PEFT folder from the tiny model (its adapter_config.json is what a user would have)."""
    from acestep_train import load_model
    from acestep_train.lora import export_lora
    from acestep_train.lora.inject import apply_lora

    decoder = load_model("tiny").model.decoder
    apply_lora(decoder, rank=2, alpha=2, target_modules=ATTENTION)
    return export_lora(decoder, tmp_path_factory.mktemp("adapter") / "peft", format="peft")


def train_args(songs: Path, tmp: Path, extra: list[str]) -> list[str]:
    return ["model=tiny", "data=audio", f"data.metadata={songs}", f"data.cache_dir={tmp / 'cache'}",
            "data.max_duration=1.0", "data.progress=false", "trainer.max_steps=1", "callbacks.validation_audio=null",
            "logger=[csv]", "exports=[]", "trainer.enable_progress_bar=false", f"hydra.run.dir={tmp / 'run'}", *extra]


def generate_args(extra: list[str]) -> list[str]:
    return ["model=tiny", "prompt=test", "duration=2", "out=t.wav", "progress=false", *extra]


def test_payload_is_live(tmp_path):
    """Negative control: the payload does run when unpickled without restrictions."""
    marker = tmp_path / "marker"
    path = hostile_checkpoint(tmp_path / "evil.ckpt", marker)
    torch.load(path, weights_only=False)
    assert marker.read_text() == "payload executed"


# ---- resume checkpoints -------------------------------------------------------------------------------------------

def test_ckpt_path_file(songs, tmp_path):
    marker = tmp_path / "marker"
    evil = hostile_checkpoint(tmp_path / "evil" / "last.ckpt", marker)
    assert_refused(run("acestep_train", train_args(songs, tmp_path, [f"ckpt_path={evil}"]), tmp_path), marker,
                   "last.ckpt")


def test_ckpt_path_url(songs, tmp_path):
    marker = tmp_path / "marker"
    name = f"last-{tmp_path.name}.ckpt"  # a name no download cache can already hold
    hostile_checkpoint(tmp_path / "served" / name, marker)
    with FileServer(tmp_path / "served") as server:
        proc = run("acestep_train", train_args(songs, tmp_path, [f"ckpt_path={server.url(name)}"]), tmp_path)
    assert_refused(proc, marker, name)


def test_export_checkpoint(tmp_path):
    from train_helpers import compose_train

    marker = tmp_path / "marker"
    run_dir = tmp_path / "run"
    cfg = compose_train(run_dir, ["model=tiny", "data=audio", "data.metadata=unused.csv"])
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    evil = hostile_checkpoint(run_dir / "checkpoints" / "last.ckpt", marker)
    assert_refused(run("acestep_train.training.export", [evil], tmp_path), marker, "last.ckpt")


# ---- model files --------------------------------------------------------------------------------------------------

def test_silence_latent(tmp_path):
    from acestep_train import load_model
    from acestep_train.checkpoints.loading import save_released_layout

    marker = tmp_path / "marker"
    repo = save_released_layout(load_model("tiny"), tmp_path / "Ace-Step1.5", SUB)
    hostile_tensor_file(repo / SUB / "silence_latent.pt", marker)
    args = generate_args([f"model.source={repo}", f"++model.subfolder={SUB}"])
    assert_refused(run("acestep_train.inference.generate", args, tmp_path), marker, "silence_latent.pt")


# ---- adapters -----------------------------------------------------------------------------------------------------

def hostile_adapter(kind: str, peft_adapter: Path, tmp: Path, marker: Path) -> tuple[Path, str]:
    """(the path to pass, the file name the message must name)."""
    if kind == "peft_bin":
        folder = tmp / "evil_peft"
        shutil.copytree(peft_adapter, folder)
        (folder / "adapter_model.safetensors").unlink()
        hostile_tensor_file(folder / "adapter_model.bin", marker)
        return folder, "adapter_model.bin"
    if kind == "pt":
        return hostile_tensor_file(tmp / "evil_lora.pt", marker), "evil_lora.pt"
    return hostile_tensor_file(tmp / "evil_lora.safetensors", marker), "evil_lora.safetensors"


ADAPTER_KINDS = ["peft_bin", "pt",
                 "renamed_safetensors"]


@pytest.mark.parametrize("kind", ADAPTER_KINDS)
def test_generate_adapter(kind, peft_adapter, tmp_path):
    marker = tmp_path / "marker"
    path, name = hostile_adapter(kind, peft_adapter, tmp_path, marker)
    args = generate_args([f"adapters=[{{path: '{path}', strength: 0.8}}]"])
    assert_refused(run("acestep_train.inference.generate", args, tmp_path), marker, name)


@pytest.mark.parametrize("kind", ADAPTER_KINDS)
def test_init_lora(kind, peft_adapter, songs, tmp_path):
    marker = tmp_path / "marker"
    path, name = hostile_adapter(kind, peft_adapter, tmp_path, marker)
    assert_refused(run("acestep_train", train_args(songs, tmp_path, [f"mode.init_lora='{path}'"]), tmp_path),
                   marker, name)


def test_fuse_loras(peft_adapter, songs, tmp_path):
    marker = tmp_path / "marker"
    path, name = hostile_adapter("peft_bin", peft_adapter, tmp_path, marker)
    args = train_args(songs, tmp_path, [f"mode.fuse_loras=[{{path: '{path}', strength: 1.0}}]"])
    assert_refused(run("acestep_train", args, tmp_path), marker, name)


# ---- the feature cache --------------------------------------------------------------------------------------------

def test_cache_items(songs, tmp_path):
    """Every cached item replaced by a pickle: the run refuses them (or re-encodes them), never unpickles."""
    marker = tmp_path / "marker"
    first = run("acestep_train.training.preprocess", train_args(songs, tmp_path, []), tmp_path)
    assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-2000:]
    items = sorted((tmp_path / "cache").rglob("items/*.safetensors"))
    assert items, "preprocess cached nothing"
    for item in items:
        hostile_tensor_file(item, marker)
    proc = run("acestep_train", train_args(songs, tmp_path, []), tmp_path)
    assert not marker.exists(), "a cached item was unpickled"
    if proc.returncode == 0:  # acceptable: the cache noticed and rebuilt the items
        from safetensors import safe_open

        for item in items:
            with safe_open(str(item), framework="pt"):
                pass
    else:
        assert_refused(proc, marker, items[0].name[:16])
