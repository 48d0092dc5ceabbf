"""Startup checks: fail loudly, before any model is built, on configs that would hang or lie.

Each check is a pure function of its arguments (plus the environment where it says so)
and raises :class:`StartupCheckError` with a message that names the offending values
and the fix. No Lightning import: the checks run before the Trainer exists.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import re
from collections.abc import Mapping, Sequence
from typing import Any

from acestep_train.cli import BadInputError


class StartupCheckError(BadInputError):
    """A configuration that cannot work on this machine / in this job."""


# Lightning treats jobs with these names as interactive allocations (salloc)
# and launches its own processes instead of expecting srun to have done it.
_INTERACTIVE_JOB_NAMES = ("bash", "interactive")


def device_count(devices: Any) -> int:
    """``trainer.devices`` as a process count: an int, a digit string or a list of ids.

    ``"auto"`` and ``-1`` are rejected: the count must be known to match SLURM tasks.
    """
    if isinstance(devices, Sequence) and not isinstance(devices, str):
        return len(devices)
    if isinstance(devices, str) and devices.strip().isdigit():
        devices = int(devices)
    if isinstance(devices, int) and not isinstance(devices, bool) and devices > 0:
        return devices
    raise StartupCheckError(
        f"trainer.devices={devices!r} is not a device count; under SLURM it must be a positive "
        "number equal to --ntasks-per-node (e.g. trainer.devices=4)"
    )


def _tasks_per_node(value: str) -> int | None:
    """Parse SLURM's ``2`` / ``2(x3)`` / ``2(x2),1`` task-count lists; None if uneven."""
    counts = {int(m.group(1)) for m in re.finditer(r"(\d+)(?:\(x\d+\))?", value)}
    return counts.pop() if len(counts) == 1 else None


def check_slurm_tasks(devices: Any, num_nodes: int, env: Mapping[str, str] = os.environ) -> None:
    """Check that the SLURM job launched exactly ``devices × num_nodes`` processes.

    Runs only inside a SLURM job (``SLURM_JOB_ID`` set). Interactive allocations
    (job name ``bash``/``interactive``, which Lightning ignores) pass unless srun
    started several tasks in them.
    Catches: python started in the batch script without ``srun`` (ranks would wait
    forever for peers, LHT #231); ``--ntasks-per-node`` ≠ ``trainer.devices``;
    ``--nodes`` ≠ ``trainer.num_nodes``; and ``SLURM_NTASKS`` smaller than
    tasks-per-node × nodes, where Lightning silently trains on fewer devices
    (Lightning-AI/pytorch-lightning #20391).

    Args:
        devices: ``trainer.devices``.
        num_nodes: ``trainer.num_nodes``.
        env: the environment to inspect (default ``os.environ``).
    """
    job_id = env.get("SLURM_JOB_ID") or env.get("SLURM_JOBID")
    if not job_id:
        return
    job_name = env.get("SLURM_JOB_NAME")
    if job_name in _INTERACTIVE_JOB_NAMES:
        step_tasks = int(env.get("SLURM_STEP_NUM_TASKS", "1"))
        if "SLURM_STEP_ID" in env and step_tasks > 1:
            raise StartupCheckError(
                f"srun started {step_tasks} tasks in SLURM job {job_id} named {job_name!r}; Lightning "
                "treats jobs named 'bash'/'interactive' as interactive and ignores SLURM, so every "
                "task would launch its own copy of the run. Give the job another name "
                "(salloc/sbatch --job-name=...), or run python without srun."
            )
        return
    ndev = device_count(devices)
    want = ndev * int(num_nodes)
    expect = f"trainer.devices={ndev} × trainer.num_nodes={num_nodes} = {want} processes"

    if "SLURM_STEP_ID" not in env:
        if want > 1:
            raise StartupCheckError(
                f"running inside SLURM job {job_id} without srun, but the config expects {expect}; "
                "the ranks would wait for each other forever. Launch with "
                "`srun python -m acestep_train ...` (acestep_train/launch/slurm.sbatch.template does), "
                "or use `python -m acestep_train.launch.submit ...`."
            )
        return

    problems = []
    ntasks = int(env.get("SLURM_NTASKS", "1"))
    per_node_raw = env.get("SLURM_NTASKS_PER_NODE")
    if per_node_raw is None:
        if ntasks > 1:
            problems.append(
                f"SLURM_NTASKS={ntasks} but SLURM_NTASKS_PER_NODE is unset "
                "(the job used --ntasks; Lightning needs --ntasks-per-node)"
            )
    else:
        per_node = _tasks_per_node(per_node_raw)
        if per_node != ndev:
            problems.append(f"SLURM_NTASKS_PER_NODE={per_node_raw} but trainer.devices={ndev}")
    nnodes = env.get("SLURM_NNODES") or env.get("SLURM_JOB_NUM_NODES")
    if nnodes is not None and int(nnodes) != int(num_nodes):
        problems.append(f"SLURM_NNODES={nnodes} but trainer.num_nodes={num_nodes}")
    if ntasks != want:
        problems.append(f"SLURM_NTASKS={ntasks} but {expect}")
    step_tasks = env.get("SLURM_STEP_NUM_TASKS")
    if step_tasks is not None and int(step_tasks) != want:
        problems.append(f"srun started {step_tasks} tasks (SLURM_STEP_NUM_TASKS) but {expect}")
    if problems:
        raise StartupCheckError(
            f"SLURM job {job_id} does not match the trainer config:\n  - "
            + "\n  - ".join(problems)
            + "\nSubmit with `python -m acestep_train.launch.submit <overrides>` (it derives --nodes and "
            "--ntasks-per-node from trainer.num_nodes and trainer.devices), or set "
            "trainer.devices / trainer.num_nodes to match the allocation."
        )


def check_batch_divisible(global_batch: int, world_size: int) -> None:
    """Check that the global batch splits evenly over ``world_size`` processes.

    Args:
        global_batch: samples per optimiser step summed over all ranks
            (per-device batch × devices × nodes, before gradient accumulation).
        world_size: number of training processes (devices × nodes).
    """
    if world_size < 1:
        raise StartupCheckError(f"world size must be >= 1, got {world_size}")
    if global_batch < 1:
        raise StartupCheckError(f"global batch size must be >= 1, got {global_batch}")
    if global_batch % world_size:
        lo = global_batch // world_size * world_size
        hi = lo + world_size
        examples = f"{lo} or {hi}" if lo else f"{hi}"
        raise StartupCheckError(
            f"global batch size {global_batch} does not divide by the world size {world_size} "
            f"(devices × nodes); use a multiple of {world_size}, e.g. {examples}"
        )


_CUDA_ONLY_STRATEGIES = ("fsdp", "deepspeed")


def check_accelerator(strategy_name: str | None, accelerator: str | None, cuda_available: bool | None = None) -> None:
    """Check that a CUDA-only strategy or ``accelerator=gpu`` has a CUDA GPU to run on.

    Args:
        strategy_name: ``trainer.strategy`` as a name (``ddp``, ``fsdp``, ``deepspeed_stage_2``)
            or a class path (``lightning.pytorch.strategies.FSDPStrategy``); None for default.
        accelerator: ``trainer.accelerator`` (``cpu``, ``gpu``, ``cuda``, ``auto``).
        cuda_available: override detection (tests); default asks torch.
    """
    if cuda_available is None:
        import torch

        cuda_available = torch.cuda.is_available()
    if cuda_available:
        return
    name = str(strategy_name or "")
    short = name.rsplit(".", 1)[-1]
    if any(s in short.lower() for s in _CUDA_ONLY_STRATEGIES):
        raise StartupCheckError(
            f"strategy {short} needs a CUDA GPU; this machine has none; "
            "use trainer=cpu or trainer=ddp with accelerator=cpu"
        )
    if str(accelerator or "").lower() in ("gpu", "cuda"):
        raise StartupCheckError(
            f"accelerator={accelerator} needs a CUDA GPU; this machine has none; "
            "use trainer=cpu or trainer=ddp with accelerator=cpu"
        )


def check_strategy_installed(strategy_name: str | None) -> None:
    """Check that a DeepSpeed strategy's package imports, before the model is loaded and the cache is built
    (otherwise the strategy fails only when the Trainer is built).

    Args:
        strategy_name: ``trainer.strategy`` as a name or class path (see ``check_accelerator``).
    """
    short = str(strategy_name or "").rsplit(".", 1)[-1]
    if "deepspeed" in short.lower() and importlib.util.find_spec("deepspeed") is None:
        raise StartupCheckError(
            f"strategy {short} needs the deepspeed package, which is not installed; install it with "
            "`pip install 'acestep-train[deepspeed]'`, or use trainer=fsdp or trainer=ddp"
        )


def check_fsdp_dtype(strategy_name: str | None, model_dtype: str | None, precision: str | None,
                     frozen_fp8: bool = False) -> None:
    """Check that FSDP will not have to flatten weights of two dtypes into one tensor.

    FSDP (``torch.distributed.fsdp``, as Lightning's ``FSDPStrategy`` uses it) flattens every wrapped unit - here
    one DiT layer, plus one root unit for everything else - into a single tensor, which has a single dtype
    ("Must flatten tensors with uniform dtype"). A bf16 base (``model.dtype=bfloat16``, the released variants)
    mixes with float32 tensors in every mode: LoRA adapters are kept in float32, and full fine-tuning keeps the
    DiT in float32 while the condition encoder stays bf16. With mixed precision the weights are not cast first,
    so ask for float32 weights (FSDP then gathers fp32 shards and computes in bf16 under autocast).
    ``precision=*-true`` casts the whole module to one dtype and passes. ``mode.frozen_fp8`` (frozen linears in
    float8 beside float32 adapters) never can.
    """
    short = str(strategy_name or "").rsplit(".", 1)[-1]
    if "fsdp" in short.lower() and frozen_fp8:
        raise StartupCheckError(
            f"strategy {short} with mode.frozen_fp8=true: FSDP flattens each DiT layer into one tensor of one dtype, "
            "and float8 frozen weights cannot share it with the float32 LoRA adapters; set mode.frozen_fp8=false, "
            "or use trainer=ddp or trainer=deepspeed_zero2"
        )
    dtype = str(model_dtype or "float32").lower().removeprefix("torch.")
    if "fsdp" not in short.lower() or dtype in ("float32", "fp32", "32") or str(precision).endswith("-true"):
        return
    raise StartupCheckError(
        f"strategy {short} with model.dtype={model_dtype} and precision={precision}: FSDP flattens each DiT layer "
        "into one tensor of one dtype, but the run mixes these weights with float32 ones (LoRA adapters, or the "
        "fully trained DiT); set model.dtype=float32 (FSDP then shards fp32 weights and computes in bf16), or use "
        "trainer=deepspeed_zero2 or trainer=ddp"
    )


def check_peft_available() -> None:
    """Check that ``peft`` imports (mode=lora); never train the full model by accident.

    Upstream ACE-Step silently trains without LoRA when PEFT is missing
    (acestep/training/trainer.py:143); this raises instead.
    """
    try:
        importlib.import_module("peft")
    except Exception as err:  # ImportError, or a broken install raising anything else
        raise StartupCheckError(
            f"mode=lora needs the peft package, which failed to import ({type(err).__name__}: {err}); "
            "install it with `pip install 'peft>=0.15'` or use mode=full"
        ) from err


_URL_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


def check_ckpt_path(ckpt_path: Any) -> None:
    """Check ``ckpt_path`` before the model is loaded and the cache is built: a local checkpoint that exists.

    Remote paths (``http://``, ``s3://``, ...) are refused: Lightning loads URLs with ``weights_only=False``, which
    runs whatever code the file's pickle holds. ``null`` and ``auto`` (resolved later) pass.

    Args:
        ckpt_path: the ``ckpt_path`` config value.
    """
    if ckpt_path is None or ckpt_path == "auto":
        return
    value = str(ckpt_path)
    if _URL_SCHEME.match(value):
        raise StartupCheckError(
            f"ckpt_path={value}: remote checkpoints are not loaded (a URL would be unpickled without "
            "weights_only, running any code inside the file); download it and pass the local path")
    if not os.path.exists(value):
        raise StartupCheckError(f"ckpt_path={value}: no such checkpoint (give the path of a .ckpt written by a run, "
                                "e.g. <run>/checkpoints/last.ckpt, or ckpt_path=auto)")


def check_no_missing_values(cfg: Any) -> None:
    """Check that every mandatory (``???``) config value was given, naming them all with their full keys (before
    any model is loaded; OmegaConf's own error names only the last key, e.g. ``metadata``)."""
    from omegaconf import OmegaConf

    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        raise StartupCheckError(", ".join(missing) + (" is" if len(missing) == 1 else " are") + " required: give "
                                + " ".join(f"{k}=..." for k in missing)
                                + (" (e.g. data.metadata=/data/songs/metadata.csv)" if "data.metadata" in missing
                                   else ""))
