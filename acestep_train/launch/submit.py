"""Render the sbatch script for a training run from its Hydra config, then submit it.

    python -m acestep_train.launch.submit model=xl-sft mode=lora trainer=gpu trainer.devices=4 trainer.num_nodes=2 --dry-run
    python -m acestep_train.launch.submit model=xl-sft mode=lora trainer=gpu trainer.devices=4 --partition=gpu --time=1-00:00:00

The overrides are composed exactly as ``python -m acestep_train`` composes them
(``conf/train.yaml``), so ``--nodes``, ``--ntasks-per-node`` and ``--gpus-per-node``
come from ``trainer.num_nodes``, ``trainer.devices`` and ``trainer.accelerator`` and
cannot drift from what the Trainer expects. Cluster knobs (partition, time, account,
…) come from the flags below, or from ``hydra.launcher.*`` when ``launcher=slurm``
is among the overrides (the same values the Submitit sweep launcher uses).

The script is written to ``<run dir>/slurm.sbatch`` and the run dir is pinned with
``hydra.run.dir=…`` so all ranks and requeued restarts share it. ``--dry-run``
prints the script and writes nothing.

Interruptions: the job asks for ``--signal=SIGUSR1@90`` and ``--requeue``. On the signal
the ranks checkpoint together at the next optimizer step (``<run dir>/hpc_ckpt_N.ckpt``) and
the job requeues itself; after ``scontrol requeue``, a preemption or a node failure SLURM
restarts it. Either way the restart resumes exactly (data position, RNG) from the newest
checkpoint in the run dir: inside SLURM ``ckpt_path=null`` means ``ckpt_path=auto``
(``acestep_train.training.strategies.resolve_ckpt_path``). Re-``sbatch``-ing the written script resumes
the same way.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from acestep_train.checkpoints.variants import CONF_DIR

TEMPLATE = Path(__file__).resolve().parent / "slurm.sbatch.template"

# hydra.launcher (submitit_slurm) keys that map 1:1 onto sbatch options.
_LAUNCHER_OPTIONS = {
    "partition": "partition",
    "account": "account",
    "qos": "qos",
    "constraint": "constraint",
    "exclude": "exclude",
    "comment": "comment",
    "mem_per_cpu": "mem-per-cpu",
    "mem_per_gpu": "mem-per-gpu",
}


def _select(cfg: Any, key: str, default: Any = None) -> Any:
    """``cfg.a.b`` for a DictConfig or nested dict, or ``default`` if absent/None."""
    if isinstance(cfg, DictConfig):
        value = OmegaConf.select(cfg, key, default=None, throw_on_missing=False)
    else:
        value = cfg
        for part in key.split("."):
            if not isinstance(value, Mapping) or part not in value:
                return default
            value = value[part]
    return default if value is None else value


def _positive_int(value: Any, key: str) -> int:
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if isinstance(value, Sequence) and not isinstance(value, str):
        value = len(value)
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(
            f"{key}={value!r}: SLURM needs an explicit positive count here "
            f"(e.g. {key}=4), not 'auto' or -1"
        )
    return value


def _gpu_requested(accelerator: Any) -> bool:
    acc = str(accelerator).lower()
    if acc in ("gpu", "cuda"):
        return True
    if acc == "cpu":
        return False
    raise ValueError(
        f"trainer.accelerator={accelerator!r}: a SLURM job must know whether to request GPUs; "
        "set trainer.accelerator=gpu or trainer.accelerator=cpu"
    )


def _job_name(cfg: Any) -> str:
    try:
        name = str(_select(cfg, "run_name", "acestep_train"))
    except Exception:  # run_name interpolates hydra runtime values that may be unset
        name = "acestep_train"
    name = re.sub(r"[^A-Za-z0-9_.+-]", "_", name) or "acestep_train"
    # Lightning treats jobs named bash/interactive as interactive and ignores SLURM.
    return "acestep_train" if name in ("bash", "interactive") else name


def render_sbatch(
    cfg: DictConfig | dict,
    overrides: list[str],
    python: str = "python",
    *,
    run_dir: Path | str | None = None,
    job_name: str | None = None,
    output: str | None = None,
    cpus_per_task: int | None = None,
    partition: str | None = None,
    time: str | None = None,
    extra_sbatch: Sequence[str] = (),
) -> str:
    """Render ``acestep_train/launch/slurm.sbatch.template`` for a composed training config.

    Args:
        cfg: the composed config (or a plain dict) with ``trainer.devices``,
            ``trainer.num_nodes`` and ``trainer.accelerator``; an optional
            ``hydra.launcher`` (from ``launcher=slurm``) supplies cluster knobs.
        overrides: the Hydra overrides that produced ``cfg``; passed on verbatim
            (shell-quoted) to ``srun python -m acestep_train``.
        python: interpreter the tasks run (the submitting venv's, usually).
        run_dir: if given, pinned as ``hydra.run.dir=`` and used for the log file.
        job_name: default ``run_name`` from the config, else ``acestep_train``.
        output: sbatch ``--output``; default ``<run_dir>/slurm-%j.out``.
        cpus_per_task: default ``hydra.launcher.cpus_per_task``, else
            ``data.num_workers + 1``, else 1.
        partition: default ``hydra.launcher.partition``.
        time: sbatch ``--time`` (e.g. ``1-00:00:00``); default
            ``hydra.launcher.timeout_min`` when ``launcher=slurm``.
        extra_sbatch: raw extra options, e.g. ``["--mem=200G", "--exclusive"]``.

    Returns:
        The script text.
    """
    devices = _positive_int(_select(cfg, "trainer.devices"), "trainer.devices")
    num_nodes = _positive_int(_select(cfg, "trainer.num_nodes", 1), "trainer.num_nodes")
    gpu = _gpu_requested(_select(cfg, "trainer.accelerator", "auto"))
    is_submitit = "submitit" in str(_select(cfg, "hydra.launcher._target_", ""))

    if cpus_per_task is None:
        cpus_per_task = _select(cfg, "hydra.launcher.cpus_per_task") if is_submitit else None
    if cpus_per_task is None:
        workers = _select(cfg, "data.num_workers")
        cpus_per_task = int(workers) + 1 if isinstance(workers, int) else 1

    options: list[str] = []
    if gpu:
        options.append(f"--gpus-per-node={devices}")
    if is_submitit:
        for key, opt in _LAUNCHER_OPTIONS.items():
            value = _select(cfg, f"hydra.launcher.{key}")
            if value is not None and not (key == "partition" and partition):
                options.append(f"--{opt}={value}")
        if time is None and _select(cfg, "hydra.launcher.timeout_min") is not None:
            options.append(f"--time={int(_select(cfg, 'hydra.launcher.timeout_min'))}")
        if _select(cfg, "hydra.launcher.mem_gb") is not None:
            options.append(f"--mem={int(_select(cfg, 'hydra.launcher.mem_gb'))}G")
        for key, value in (_select(cfg, "hydra.launcher.additional_parameters") or {}).items():
            options.append(f"--{key.replace('_', '-')}={value}")
    if partition:
        options.append(f"--partition={partition}")
    if time:
        options.append(f"--time={time}")
    options.extend(extra_sbatch)

    overrides = list(overrides)
    if run_dir is not None:
        run_dir = Path(run_dir)
        if not any(o.lstrip("+").startswith("hydra.run.dir=") for o in overrides):
            overrides.append(f"hydra.run.dir={run_dir}")
        output = output or str(run_dir / "slurm-%j.out")

    return TEMPLATE.read_text().format(
        job_name=job_name or _job_name(cfg),
        num_nodes=num_nodes,
        devices=devices,
        cpus_per_task=int(cpus_per_task),
        optional_sbatch="".join(f"#SBATCH {opt}\n" for opt in options),
        output=output or "slurm-%j.out",
        python=shlex.quote(python),
        overrides=" ".join(shlex.quote(o) for o in overrides),
    )


def compose(overrides: list[str], config_dir: Path = CONF_DIR, config_name: str = "train") -> DictConfig:
    """Compose the training config (with its ``hydra`` node) as ``python -m acestep_train`` would."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.hydra_config import HydraConfig

    with initialize_config_dir(config_dir=str(Path(config_dir).resolve()), version_base="1.3"):
        cfg = hydra_compose(config_name=config_name, overrides=overrides, return_hydra_config=True)
    # Lets ${hydra:...} interpolations (run_name, run dir) resolve outside a Hydra run.
    HydraConfig.instance().set_config(cfg)
    return cfg


def run_dir_of(cfg: DictConfig) -> Path:
    """The run directory Hydra would create now, made absolute (ranks may start elsewhere)."""
    return Path(str(OmegaConf.select(cfg, "hydra.run.dir"))).resolve()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m acestep_train.launch.submit",
        description="Render acestep_train/launch/slurm.sbatch.template from the training config and sbatch it.",
    )
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, as for python -m acestep_train")
    parser.add_argument("--dry-run", action="store_true", help="print the script; write and submit nothing")
    parser.add_argument("--python", default=sys.executable, help="interpreter for the tasks (default: this one)")
    parser.add_argument("--partition")
    parser.add_argument("--time", help="sbatch --time, e.g. 1-00:00:00")
    parser.add_argument("--cpus-per-task", type=int)
    parser.add_argument("--job-name")
    parser.add_argument(
        "--sbatch", action="append", default=[], metavar="OPT", help="extra sbatch option, repeatable: --sbatch=--exclusive"
    )
    parser.add_argument("--config-dir", type=Path, default=CONF_DIR)
    parser.add_argument("--config-name", default="train")
    args = parser.parse_args(argv)

    from hydra.errors import HydraException

    from acestep_train.cli import EXIT_BAD_INPUT, TRACEBACK_ENV, bad_input_cause, bad_input_errors, one_line

    try:
        cfg = compose(args.overrides, args.config_dir, args.config_name)
        run_dir = run_dir_of(cfg)
        script = render_sbatch(
            cfg,
            args.overrides,
            python=args.python,
            run_dir=run_dir,
            job_name=args.job_name,
            cpus_per_task=args.cpus_per_task,
            partition=args.partition,
            time=args.time,
            extra_sbatch=args.sbatch,
        )
    except Exception as err:  # bad input -> one `error:` line and status 2, like every other command
        cause = bad_input_cause(err, (HydraException, ValueError, *bad_input_errors()))
        if cause is None or os.environ.get(TRACEBACK_ENV, "") not in ("", "0"):
            raise
        print(f"error: {one_line(cause)}", file=sys.stderr)
        return EXIT_BAD_INPUT
    script_path = run_dir / "slurm.sbatch"
    if args.dry_run:
        print(f"# would write {script_path} and run: sbatch {script_path}")
        print(script, end="")
        return 0
    run_dir.mkdir(parents=True, exist_ok=True)
    script_path.write_text(script)
    try:
        proc = subprocess.run(["sbatch", "--parsable", str(script_path)], capture_output=True, text=True)
    except FileNotFoundError:
        print(f"acestep_train.launch.submit: sbatch not found; wrote {script_path}, submit it from a SLURM login node", file=sys.stderr)
        return 127
    if proc.returncode != 0:
        print(f"sbatch {script_path} failed:\n{proc.stderr}", file=sys.stderr)
        return proc.returncode
    job_id = proc.stdout.strip().split(";")[0]
    print(f"submitted job {job_id}: {script_path}\nlog: {run_dir}/slurm-{job_id}.out")
    return 0


if __name__ == "__main__":
    sys.exit(main())
