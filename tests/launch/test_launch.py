"""SLURM launch path without a cluster: sbatch rendering, acestep_train.launch.submit --dry-run,
the launcher configs, and every startup check's failure message."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

REPO = Path(__file__).resolve().parents[2]

from acestep_train.training import checks
from acestep_train.training.checks import StartupCheckError
from acestep_train.launch import submit
from acestep_train.launch.submit import render_sbatch


def trainer_cfg(devices=4, num_nodes=2, accelerator="gpu", **extra):
    return {"trainer": {"devices": devices, "num_nodes": num_nodes, "accelerator": accelerator}, **extra}


def sbatch_lines(script: str) -> list[str]:
    return [line for line in script.splitlines() if line.startswith("#SBATCH")]


# ------------------------------------------------------------------ render_sbatch
def test_render_gpu_resources_follow_trainer():
    script = render_sbatch(trainer_cfg(devices=4, num_nodes=2), ["trainer=ddp"], python="/venv/bin/python")
    lines = sbatch_lines(script)
    assert "#SBATCH --nodes=2" in lines
    assert "#SBATCH --ntasks-per-node=4" in lines
    assert "#SBATCH --gpus-per-node=4" in lines
    assert "#SBATCH --signal=SIGUSR1@90" in lines
    assert "#SBATCH --requeue" in lines
    assert "#SBATCH --job-name=acestep_train" in lines
    assert any(line.startswith("#SBATCH --output=") for line in lines)
    assert any(line.startswith("#SBATCH --cpus-per-task=") for line in lines)
    assert "srun --kill-on-bad-exit=1 /venv/bin/python -m acestep_train trainer=ddp" in script
    assert script.startswith("#!/bin/bash\n")


def test_render_cpu_requests_no_gpus():
    script = render_sbatch(trainer_cfg(devices=2, num_nodes=1, accelerator="cpu"), [])
    assert not any("--gpus" in line for line in sbatch_lines(script))
    assert "#SBATCH --ntasks-per-node=2" in sbatch_lines(script)


def test_sbatch_directives_precede_commands():
    # sbatch stops reading #SBATCH lines at the first command.
    lines = render_sbatch(trainer_cfg(), [], partition="gpu", time="10:00").splitlines()
    first_cmd = next(i for i, line in enumerate(lines) if line and not line.startswith("#"))
    assert max(i for i, line in enumerate(lines) if line.startswith("#SBATCH")) < first_cmd


def test_render_quotes_overrides_and_pins_run_dir(tmp_path):
    run_dir = tmp_path / "run 1"
    script = render_sbatch(trainer_cfg(), ["model=xl-sft", "+tags=[a, b]"], run_dir=run_dir)
    assert "model=xl-sft '+tags=[a, b]' " in script
    assert f"'hydra.run.dir={run_dir}'" in script
    assert f"#SBATCH --output={run_dir}/slurm-%j.out" in sbatch_lines(script)
    # an explicit hydra.run.dir is kept, not duplicated
    script = render_sbatch(trainer_cfg(), ["hydra.run.dir=/x"], run_dir=run_dir)
    assert script.count("hydra.run.dir=") == 1


def test_rendered_script_is_valid_bash(tmp_path):
    path = tmp_path / "job.sbatch"
    path.write_text(render_sbatch(trainer_cfg(), ["a=1", "+b=[x, 'y z']"], run_dir=tmp_path))
    subprocess.run(["bash", "-n", str(path)], check=True)


def test_render_reads_submitit_launcher_knobs_and_flags_override():
    cfg = trainer_cfg(
        hydra={
            "launcher": {
                "_target_": "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher",
                "partition": "big",
                "cpus_per_task": 12,
                "timeout_min": 600,
                "account": "proj",
                "mem_gb": 200,
                "additional_parameters": {"exclusive": "user"},
            }
        }
    )
    lines = sbatch_lines(render_sbatch(cfg, []))
    for expected in ("--partition=big", "--cpus-per-task=12", "--time=600", "--account=proj", "--mem=200G"):
        assert f"#SBATCH {expected}" in lines
    assert "#SBATCH --exclusive=user" in lines
    lines = sbatch_lines(render_sbatch(cfg, [], partition="small", cpus_per_task=3, time="1:00:00"))
    assert "#SBATCH --partition=small" in lines and "#SBATCH --partition=big" not in lines
    assert "#SBATCH --cpus-per-task=3" in lines and "#SBATCH --time=1:00:00" in lines


def test_render_accepts_dictconfig_and_cpus_from_workers():
    cfg = OmegaConf.create({**trainer_cfg(), "data": {"num_workers": 5}, "run_name": "xl_lora"})
    script = render_sbatch(cfg, [])
    assert "#SBATCH --cpus-per-task=6" in sbatch_lines(script)
    assert "#SBATCH --job-name=xl_lora" in sbatch_lines(script)


@pytest.mark.parametrize(
    "cfg, match",
    [
        (trainer_cfg(devices="auto"), "trainer.devices='auto'"),
        (trainer_cfg(devices=-1), "trainer.devices=-1"),
        (trainer_cfg(num_nodes=0), "trainer.num_nodes=0"),
        (trainer_cfg(accelerator="auto"), "trainer.accelerator='auto'"),
    ],
)
def test_render_rejects_unknown_resources(cfg, match):
    with pytest.raises(ValueError, match=match.replace(".", r"\.")):
        render_sbatch(cfg, [])


# --------------------------------------------------------- compose + dry run
@pytest.fixture
def config_dir(tmp_path):
    """A small stand-in for conf/: train.yaml + trainer group + the real launcher group."""
    conf = tmp_path / "conf"
    (conf / "trainer").mkdir(parents=True)
    shutil.copytree(REPO / "acestep_train" / "conf" / "launcher", conf / "launcher")
    (conf / "train.yaml").write_text(
        "defaults:\n  - _self_\n  - trainer: ddp\n  - launcher: local\n"
        "run_name: tiny_${hydra:runtime.choices.trainer}\n"
    )
    (conf / "trainer" / "ddp.yaml").write_text("accelerator: gpu\ndevices: 4\nnum_nodes: 2\nstrategy: ddp\n")
    return conf


def test_dry_run_prints_script_and_writes_nothing(config_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    run_dir = tmp_path / "runs" / "r1"
    rc = submit.main(
        ["--config-dir", str(config_dir), "trainer.devices=2", f"hydra.run.dir={run_dir}", "--dry-run"]
    )
    out = capsys.readouterr().out
    assert rc == 0
    assert f"would write {run_dir}/slurm.sbatch" in out
    assert "#SBATCH --nodes=2\n" in out and "#SBATCH --ntasks-per-node=2\n" in out
    assert "#SBATCH --gpus-per-node=2\n" in out and "#SBATCH --job-name=tiny_ddp\n" in out
    assert f"-m acestep_train trainer.devices=2 hydra.run.dir={run_dir}\n" in out
    assert not run_dir.exists() and not (tmp_path / "outputs").exists()


def test_dry_run_reports_bad_config(config_dir, capsys):
    assert submit.main(["--config-dir", str(config_dir), "trainer.accelerator=auto", "--dry-run"]) == 2
    assert "set trainer.accelerator=gpu or trainer.accelerator=cpu" in capsys.readouterr().err


def test_submit_writes_script_to_run_dir_and_calls_sbatch(config_dir, tmp_path, monkeypatch):
    calls = []

    def fake_run(cmd, **kw):
        calls.append(cmd)
        return subprocess.CompletedProcess(cmd, 0, stdout="42\n", stderr="")

    monkeypatch.setattr(submit.subprocess, "run", fake_run)
    run_dir = tmp_path / "run"
    assert submit.main(["--config-dir", str(config_dir), f"hydra.run.dir={run_dir}"]) == 0
    assert calls == [["sbatch", "--parsable", str(run_dir / "slurm.sbatch")]]
    assert "#SBATCH --ntasks-per-node=4" in (run_dir / "slurm.sbatch").read_text()


def test_launcher_slurm_composes_with_installed_submitit(config_dir, tmp_path, monkeypatch, capsys):
    """conf/launcher/slurm.yaml loads hydra-submitit-launcher's config and follows the trainer."""
    from hydra.utils import get_class

    cfg = submit.compose(["launcher=slurm", "trainer.devices=8", "trainer.num_nodes=3"], config_dir)
    launcher = cfg.hydra.launcher
    assert get_class(launcher._target_).__name__ == "SlurmLauncher"
    assert (launcher.nodes, launcher.tasks_per_node, launcher.gpus_per_node) == (3, 8, 8)
    assert launcher.signal_delay_s == 90
    # and acestep_train.launch.submit picks the same knobs up
    monkeypatch.chdir(tmp_path)
    args = ["--config-dir", str(config_dir), "launcher=slurm", "hydra.launcher.partition=p1", "--dry-run"]
    assert submit.main(args) == 0
    out = capsys.readouterr().out
    assert "#SBATCH --partition=p1\n" in out and "#SBATCH --time=1440\n" in out
    assert "#SBATCH --cpus-per-task=8\n" in out


def test_launcher_local_is_a_noop(config_dir):
    cfg = submit.compose(["launcher=local"], config_dir)
    assert "submitit" not in cfg.hydra.launcher._target_


@pytest.mark.skipif(not (REPO / "acestep_train" / "conf" / "train.yaml").exists(), reason="conf/train.yaml not written yet")
def test_dry_run_with_real_training_config(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    overrides = ["trainer.devices=2", "trainer.num_nodes=1", "trainer.accelerator=cpu", f"hydra.run.dir={tmp_path}"]
    assert submit.main([*overrides, "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "#SBATCH --ntasks-per-node=2\n" in out and "--gpus-per-node" not in out


# --------------------------------------------------------------------- checks
def slurm_env(**kv):
    base = {
        "SLURM_JOB_ID": "7",
        "SLURM_JOB_NAME": "acestep",
        "SLURM_STEP_ID": "0",
        "SLURM_NTASKS": "8",
        "SLURM_NTASKS_PER_NODE": "4",
        "SLURM_NNODES": "2",
        "SLURM_STEP_NUM_TASKS": "8",
    }
    base.update(kv)
    return {k: v for k, v in base.items() if v is not None}


def test_slurm_check_passes_outside_slurm_and_when_matching():
    checks.check_slurm_tasks(4, 2, env={})
    checks.check_slurm_tasks(4, 2, env=slurm_env())
    checks.check_slurm_tasks(4, 2, env=slurm_env(SLURM_NTASKS_PER_NODE="4(x2)"))
    checks.check_slurm_tasks([0, 1, 2, 3], 2, env=slurm_env())
    # python straight in the batch script is fine for a single process
    checks.check_slurm_tasks(1, 1, env=slurm_env(SLURM_STEP_ID=None, SLURM_NTASKS="1", SLURM_NNODES="1"))
    # interactive allocation (salloc): Lightning ignores SLURM and spawns its own processes
    checks.check_slurm_tasks(4, 1, env=slurm_env(SLURM_JOB_NAME="bash", SLURM_STEP_ID=None))


@pytest.mark.parametrize(
    "env, devices, num_nodes, messages",
    [
        (slurm_env(SLURM_NTASKS_PER_NODE="2", SLURM_NTASKS="4", SLURM_STEP_NUM_TASKS="4"), 4, 2,
         ["SLURM_NTASKS_PER_NODE=2 but trainer.devices=4", "SLURM_NTASKS=4 but trainer.devices=4 × trainer.num_nodes=2 = 8"]),
        (slurm_env(SLURM_NNODES="1", SLURM_NTASKS="4", SLURM_STEP_NUM_TASKS="4"), 4, 2,
         ["SLURM_NNODES=1 but trainer.num_nodes=2"]),
        # Lightning #20391: fewer tasks than tasks-per-node x nodes
        (slurm_env(SLURM_NTASKS="6", SLURM_STEP_NUM_TASKS="6"), 4, 2, ["SLURM_NTASKS=6 but"]),
        (slurm_env(SLURM_NTASKS_PER_NODE=None), 4, 2, ["SLURM_NTASKS_PER_NODE is unset", "--ntasks-per-node"]),
        (slurm_env(SLURM_STEP_NUM_TASKS="1"), 4, 2, ["srun started 1 tasks (SLURM_STEP_NUM_TASKS)"]),
        (slurm_env(SLURM_NTASKS_PER_NODE="4,2"), 4, 2, ["SLURM_NTASKS_PER_NODE=4,2 but trainer.devices=4"]),
    ],
)
def test_slurm_check_mismatch_messages(env, devices, num_nodes, messages):
    with pytest.raises(StartupCheckError) as err:
        checks.check_slurm_tasks(devices, num_nodes, env=env)
    text = str(err.value)
    assert "SLURM job 7 does not match the trainer config" in text
    assert "python -m acestep_train.launch.submit" in text
    for message in messages:
        assert message in text


def test_slurm_check_without_srun():
    env = slurm_env(SLURM_STEP_ID=None)
    with pytest.raises(StartupCheckError, match=r"inside SLURM job 7 without srun.*srun python -m acestep_train"):
        checks.check_slurm_tasks(4, 2, env=env)


def test_slurm_check_srun_in_interactive_allocation():
    env = slurm_env(SLURM_JOB_NAME="interactive", SLURM_NTASKS="2", SLURM_STEP_NUM_TASKS="2")
    with pytest.raises(StartupCheckError, match="treats jobs named 'bash'/'interactive' as interactive"):
        checks.check_slurm_tasks(2, 1, env=env)


def test_slurm_check_needs_device_count():
    with pytest.raises(StartupCheckError, match="trainer.devices='auto' is not a device count"):
        checks.check_slurm_tasks("auto", 1, env=slurm_env())


def test_batch_divisible():
    checks.check_batch_divisible(32, 8)
    with pytest.raises(StartupCheckError, match=r"global batch size 30 does not divide by the world size 8 .* e.g. 24 or 32"):
        checks.check_batch_divisible(30, 8)
    with pytest.raises(StartupCheckError, match=r"use a multiple of 4, e.g. 4$"):
        checks.check_batch_divisible(3, 4)
    with pytest.raises(StartupCheckError, match="world size must be >= 1"):
        checks.check_batch_divisible(8, 0)


@pytest.mark.parametrize(
    "strategy, accelerator, shown",
    [
        ("fsdp", "cpu", "strategy fsdp"),
        ("deepspeed_stage_2", "auto", "strategy deepspeed_stage_2"),
        ("lightning.pytorch.strategies.FSDPStrategy", "gpu", "strategy FSDPStrategy"),
        ("ddp", "gpu", "accelerator=gpu"),
        (None, "cuda", "accelerator=cuda"),
    ],
)
def test_accelerator_needs_cuda(strategy, accelerator, shown):
    with pytest.raises(StartupCheckError) as err:
        checks.check_accelerator(strategy, accelerator, cuda_available=False)
    assert str(err.value) == (
        f"{shown} needs a CUDA GPU; this machine has none; use trainer=cpu or trainer=ddp with accelerator=cpu"
    )


def test_accelerator_ok():
    checks.check_accelerator("ddp", "cpu", cuda_available=False)
    checks.check_accelerator(None, "auto", cuda_available=False)
    checks.check_accelerator("fsdp", "gpu", cuda_available=True)
    checks.check_accelerator("ddp", "cpu")  # real detection path


def test_peft_available(monkeypatch):
    checks.check_peft_available()
    monkeypatch.setitem(sys.modules, "peft", None)  # makes `import peft` raise ImportError
    with pytest.raises(StartupCheckError, match=r"mode=lora needs the peft package.*pip install"):
        checks.check_peft_available()
