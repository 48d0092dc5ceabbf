"""A Hydra ``-m`` sweep straight from an empty folder, as a user types it: both points run to the end (their LoRA
exported) in their own folders under multirun/<run_name>/<time>/<job number>."""

import os
import subprocess
import sys

import yaml


def test_multirun_sweep_of_two_points_finishes_both(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONWARNINGS": "ignore",
           "ACESTEP_DATA_CACHE": str(tmp_path / "features"), "ACESTEP_MODEL_CACHE": str(tmp_path / "models")}
    tiny = ["trainer.max_steps=1", "callbacks=none", "logger=[csv]", "trainer.enable_progress_bar=false",
            "data.demo.n=2", "data.demo.seconds=2.0", "data.max_duration=2.0", "data.progress=false",
            "exports=[acestep]"]
    proc = subprocess.run([sys.executable, "-m", "acestep_train", "-m", "mode.lora.rank=2,4", *tiny], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (sweep,) = (tmp_path / "multirun" / "tiny-lora").iterdir()  # run_name of the base config, then the time
    jobs = sorted(p for p in sweep.iterdir() if p.is_dir())
    assert [p.name for p in jobs] == ["0", "1"]
    for job, rank in zip(jobs, (2, 4)):
        cfg = yaml.safe_load((job / "config.yaml").read_text())
        assert cfg["mode"]["lora"]["rank"] == rank and cfg["run_name"] == "tiny-lora"
        assert (job / "exports" / "lora.safetensors").is_file(), f"job {job.name} did not reach its export"
    assert os.listdir(tmp_path) == ["multirun"]  # nothing else written where the command ran
