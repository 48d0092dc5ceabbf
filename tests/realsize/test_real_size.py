"""Real-size tier (opt-in, not in CI): random-weight folders at the full released size, built from the key
manifests in the released layout and dtypes (``realsize_build.py``), run through the user's commands — generate,
one LoRA training step, one full fine-tuning step with a memory-lean optimizer — each as its own process, printing
wall time and peak RSS (and any memory estimate the command printed).

    pytest tests/realsize -s --run-realsize                 # 2B and XL
    ACESTEP_REALSIZE=1 ACESTEP_REALSIZE_SIZES=2b pytest tests/realsize -s

Knobs (environment): ``ACESTEP_REALSIZE_SIZES`` (``2b,xl``), ``ACESTEP_REALSIZE_TRAINER`` (default ``trainer=gpu``
with CUDA, else ``trainer=cpu``), ``ACESTEP_REALSIZE_OPTIMIZER`` (the full step's optimizer override, default
``mode/optimizer=adafactor``), ``ACESTEP_REALSIZE_REPORT`` (a JSON-lines file the results are
appended to), ``ACESTEP_REALSIZE_DIR`` (where the ~7 GB (2B) / ~17 GB (2B+XL) of folders are built; default the
test's temporary folder).

Memory needed (CPU): generate 2B ~8 GB; LoRA step 2B ~10 GB; full step 2B: the DiT's 1.6 B trained parameters in
float32 with their gradients are ~13 GB before activations; XL roughly 2.5x the DiT part.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from realsize_build import build_components, build_dit

from user_env import user_env

REPO = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.realsize,
              pytest.mark.skipif(os.environ.get("ACESTEP_REALSIZE") != "1",
                                 reason="real-size tier is opt-in: --run-realsize or ACESTEP_REALSIZE=1")]
VARIANT = {"2b": "turbo", "xl": "xl-turbo"}
SIZES = [s.strip() for s in os.environ.get("ACESTEP_REALSIZE_SIZES", "2b,xl").split(",") if s.strip()]
OPTIMIZER = shlex.split(os.environ.get("ACESTEP_REALSIZE_OPTIMIZER", "mode/optimizer=adafactor"))


def trainer() -> list[str]:
    if os.environ.get("ACESTEP_REALSIZE_TRAINER"):
        return shlex.split(os.environ["ACESTEP_REALSIZE_TRAINER"])
    import torch

    return ["trainer=gpu"] if torch.cuda.is_available() else ["trainer=cpu"]


@pytest.fixture(scope="module")
def build_root(tmp_path_factory) -> Path:
    root = Path(os.environ["ACESTEP_REALSIZE_DIR"]) if os.environ.get("ACESTEP_REALSIZE_DIR") else \
        tmp_path_factory.mktemp("realsize")
    root.mkdir(parents=True, exist_ok=True)
    return root


@pytest.fixture(scope="module")
def folders(build_root):
    """Built on first use per size; a folder already built in ``ACESTEP_REALSIZE_DIR`` is reused."""
    built = {}

    def get(size: str) -> list[str]:
        if size not in built:
            components = build_root / "Ace-Step1.5"
            if not (components / "vae" / "config.json").is_file():
                t0 = time.monotonic()
                build_components(components)
                report({"what": "build components", "wall_s": round(time.monotonic() - t0, 1)})
            if size == "2b":
                dit, overrides = components / "acestep-v15-turbo", ["model=turbo", f"model.source={components}"]
            else:
                dit = build_root / "acestep-v15-xl-turbo"
                overrides = ["model=xl-turbo", f"model.source={dit}", f"model.components_source={components}"]
            if not (dit / "config.json").is_file():
                t0 = time.monotonic()
                build_dit(dit, VARIANT[size])
                report({"what": f"build {size} DiT", "wall_s": round(time.monotonic() - t0, 1)})
            built[size] = overrides
        return built[size]

    return get


@pytest.fixture(scope="module")
def songs(tmp_path_factory) -> Path:
    from datamodules.demo import make_demo_dataset

    return make_demo_dataset(tmp_path_factory.mktemp("realsize-data") / "songs", n=2, seconds=10.0, seed=0)


def env(tmp: Path) -> dict[str, str]:
    return user_env(tmp)


def measure(what: str, module: str, args: list[str], cwd: Path) -> dict:
    """Run ``python -m module args`` as its own process; wall time and that process's peak RSS (``wait4``)."""
    log_path = cwd / (re.sub(r"[^\w.=-]+", "_", what) + ".log")  # overrides such as mode/optimizer=... hold "/"
    t0 = time.monotonic()
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", module, *args], cwd=cwd, env=env(cwd), stdout=log,
                                stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    output = log_path.read_text(errors="replace")
    result = {"what": what, "exit": proc.returncode, "wall_s": round(time.monotonic() - t0, 1),
              "peak_rss_gb": round(usage.ru_maxrss / 2**20, 2),
              "memory_lines": [line.strip() for line in output.splitlines() if "estimat" in line.lower()][:12]}
    report(result)
    assert proc.returncode == 0, f"{what} failed (exit {proc.returncode}); log {log_path}:\n{output[-4000:]}"
    return result


def report(result: dict) -> None:
    print(f"\n[realsize] {json.dumps(result)}", flush=True)
    if os.environ.get("ACESTEP_REALSIZE_REPORT"):
        with open(os.environ["ACESTEP_REALSIZE_REPORT"], "a") as f:
            f.write(json.dumps(result) + "\n")


def train_args(model: list[str], songs: Path, mode: list[str], tmp: Path) -> list[str]:
    return [*model, *mode, "data=audio", f"data.metadata={songs}", "data.max_duration=10.0", "data.batch_size=1",
            "trainer.max_steps=1", *trainer(), "callbacks.validation_audio=null", "logger=[csv]",
            f"hydra.run.dir={tmp / 'run'}", "data.progress=false"]


@pytest.mark.parametrize("size", SIZES)
def test_generate(size, folders, tmp_path):
    model = folders(size)
    measure(f"{size} generate", "acestep_train.inference.generate",
            [*model, "prompt=warm synth pad", "duration=10", "seed=1", "out=song.wav", "progress=false"], tmp_path)
    audio, rate = sf.read(tmp_path / "song.wav", always_2d=True)
    assert rate == 48000 and np.isfinite(audio).all()


@pytest.mark.parametrize("size", SIZES)
def test_one_lora_step(size, folders, songs, tmp_path):
    measure(f"{size} lora step", "acestep_train",
            train_args(folders(size), songs, ["mode=lora", "exports=[acestep]"], tmp_path), tmp_path)
    assert (tmp_path / "run" / "exports" / "lora.safetensors").is_file()


@pytest.mark.parametrize("size", SIZES)
def test_one_full_step_lean_optimizer(size, folders, songs, tmp_path):
    measure(f"{size} full step ({' '.join(OPTIMIZER)})", "acestep_train",
            train_args(folders(size), songs, ["mode=full", *OPTIMIZER, "exports=[]"], tmp_path), tmp_path)
    assert (tmp_path / "run" / "checkpoints" / "last.ckpt").is_file()
