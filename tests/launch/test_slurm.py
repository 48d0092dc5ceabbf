"""A real single-node SLURM cluster: 2-task srun job, requeue, checks under real SLURM env, teardown.

    bash .ci/slurm-setup.sh && pytest -m slurm tests/test_slurm.py

Skipped when the SLURM/MUNGE binaries are missing or not running as root, unless
ACESTEP_REQUIRE_SLURM=1 (set it in CI after .ci/slurm-setup.sh, so a broken install fails).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

from slurm_cluster import LocalSlurmCluster, slurm_available, submit_and_wait

REQUIRED = os.environ.get("ACESTEP_REQUIRE_SLURM") == "1"
pytestmark = [
    pytest.mark.slurm,
    pytest.mark.skipif(not slurm_available() and not REQUIRED, reason="SLURM not installed (bash .ci/slurm-setup.sh)"),
    # slurmd launches job steps as the submitting user; only the root setup (CI) is tested.
    pytest.mark.skipif(os.geteuid() != 0 and not REQUIRED, reason="LocalSlurmCluster is tested as root only"),
]

JOB_TIMEOUT = 120  # seconds; jobs here take ~1 s, a requeue ~7 s (AuthInfo cred_expire=5)


def write_job(path: Path, body: str, **sbatch: object) -> Path:
    """A batch script with ``#SBATCH --key=value`` lines (``--key`` for True), then ``body``."""
    opts = "".join(
        f"#SBATCH --{k.replace('_', '-')}" + ("" if v is True else f"={v}") + "\n" for k, v in sbatch.items()
    )
    header = f"#!/bin/bash\n{opts}set -eu\nexport PYTHONPATH={REPO}\n"
    path.write_text(header + textwrap.dedent(body))
    return path


def is_alive(pid: int) -> bool:
    """Running or sleeping, not gone and not a zombie awaiting its reaper."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[-1].split()[0] != "Z"


def live_pgrep(*args: str) -> list[int]:
    proc = subprocess.run(["pgrep", *args], capture_output=True, text=True)
    return [pid for pid in map(int, proc.stdout.split()) if is_alive(pid)]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    with LocalSlurmCluster(tmp_path_factory.mktemp("slurm")) as c:
        print(f"\nLocalSlurmCluster started in {c.startup_seconds:.1f}s")
        yield c


RANK_PY = """\
import json, os, sys, time
from acestep_train.training.checks import check_slurm_tasks
check_slurm_tasks(devices=2, num_nodes=1)  # real srun environment must pass
env = {k: os.environ.get(k) for k in ("SLURM_PROCID", "SLURM_LOCALID", "SLURM_NTASKS", "SLURM_NTASKS_PER_NODE")}
time.sleep(0.5)
open(os.path.join(sys.argv[1], f"rank{env['SLURM_PROCID']}.json"), "w").write(json.dumps(env))
"""

NO_SRUN_PY = """\
import sys
from acestep_train.training.checks import StartupCheckError, check_slurm_tasks
try:
    check_slurm_tasks(devices=2, num_nodes=1)
except StartupCheckError as err:
    open(sys.argv[1], "w").write(str(err))
"""


def test_two_task_job_completes(cluster, tmp_path):
    (tmp_path / "rank.py").write_text(RANK_PY)
    (tmp_path / "no_srun.py").write_text(NO_SRUN_PY)
    script = write_job(
        tmp_path / "ranks.sbatch",
        f"""\
        {sys.executable} {tmp_path}/no_srun.py {tmp_path}/no_srun.txt
        srun {sys.executable} {tmp_path}/rank.py {tmp_path}
        """,
        job_name="ranks",
        nodes=1,
        ntasks_per_node=2,
        output=tmp_path / "ranks-%j.out",
    )
    t0 = time.monotonic()
    info = submit_and_wait(cluster, script, JOB_TIMEOUT)
    print(f"2-task job finished in {time.monotonic() - t0:.1f}s")
    log = Path(info["StdOut"]).read_text()
    assert info["JobState"] == "COMPLETED", f"{info}\n{log}"
    assert info["ExitCode"] == "0:0"
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert [r["SLURM_PROCID"] for r in ranks] == ["0", "1"]
    assert all(r["SLURM_NTASKS"] == "2" and r["SLURM_NTASKS_PER_NODE"] == "2" for r in ranks)
    # python in the batch script itself (no srun) with 2 devices must be refused
    assert "without srun" in (tmp_path / "no_srun.txt").read_text()


def test_requeued_job_runs_again(cluster, tmp_path):
    starts = tmp_path / "starts"
    script = write_job(
        tmp_path / "requeue.sbatch",
        f"""\
        echo "${{SLURM_RESTART_COUNT:-0}}" >> {starts}
        # SLURM_RESTART_COUNT is unset on the first start, 1 after one requeue.
        if [ "${{SLURM_RESTART_COUNT:-0}}" = 0 ]; then
          for i in $(seq 120); do sleep 1; done
        fi
        srun -n1 true
        """,
        job_name="requeue",
        ntasks=1,
        requeue=True,
        open_mode="append",
        output=tmp_path / "requeue-%j.out",
    )
    job_id = cluster.sbatch(script)
    cluster.wait_for_job(job_id, JOB_TIMEOUT, {"RUNNING"})
    deadline = time.monotonic() + JOB_TIMEOUT
    while not starts.exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert starts.read_text().split() == ["0"]

    t0 = time.monotonic()
    cluster.run("scontrol", "requeue", str(job_id))
    info = cluster.wait_for_job(job_id, JOB_TIMEOUT)
    print(f"requeue -> completed in {time.monotonic() - t0:.1f}s")
    log = Path(info["StdOut"]).read_text()
    assert info["JobState"] == "COMPLETED", f"{info}\n{log}"
    assert info["Restarts"] == "1"
    assert starts.read_text().split() == ["0", "1"]
    assert "DUE TO JOB REQUEUE" in log


def test_teardown_leaves_no_processes(tmp_path):
    cluster = LocalSlurmCluster(tmp_path / "c")
    with cluster:
        script = write_job(
            tmp_path / "long.sbatch",
            f"srun bash -c 'echo $$ > {tmp_path}/pid.$SLURM_PROCID; exec sleep 300'\n",
            ntasks_per_node=2,
            output=tmp_path / "long-%j.out",
        )
        job_id = cluster.sbatch(script)
        cluster.wait_for_job(job_id, JOB_TIMEOUT, {"RUNNING"})
        deadline = time.monotonic() + JOB_TIMEOUT
        while len(list(tmp_path.glob("pid.*"))) < 2 and time.monotonic() < deadline:
            time.sleep(0.2)
        task_pids = [int(p.read_text()) for p in tmp_path.glob("pid.*")]
        daemons = cluster.daemon_pids
        run_dir = cluster.run_dir
        assert len(task_pids) == 2 and all(map(is_alive, task_pids))
        assert set(daemons) == {"munged", "slurmctld", "slurmd"}
        assert cluster.leftover_pids()  # the finder does see the live cluster
    # the cluster was torn down with a job still running
    assert not [pid for pid in [*task_pids, *daemons.values()] if is_alive(pid)]
    assert cluster.leftover_pids() == []
    assert not run_dir.exists()
    if shutil.which("pgrep"):
        assert live_pgrep("-s", ",".join(map(str, daemons.values()))) == []
        assert live_pgrep("-f", str(run_dir)) == []
        assert live_pgrep("-f", str(tmp_path)) == []


FAKE_PYTHON = """\
#!/bin/bash
# Stands in for the interpreter in a rendered sbatch script: records argv and the SLURM layout.
printf '%s\\n' "$@" > "{out}/argv.$SLURM_PROCID"
echo "$SLURM_PROCID $SLURM_NTASKS $SLURM_NTASKS_PER_NODE $SLURM_CPUS_PER_TASK" > "{out}/env.$SLURM_PROCID"
"""


def test_rendered_sbatch_runs(cluster, tmp_path):
    """acestep_train.launch.submit's script is accepted by real sbatch and srun hands every rank the overrides intact."""
    from acestep_train.launch.submit import render_sbatch

    fake = tmp_path / "fake-python"
    fake.write_text(FAKE_PYTHON.format(out=tmp_path))
    fake.chmod(0o755)
    cfg = {"trainer": {"devices": 2, "num_nodes": 1, "accelerator": "cpu"}, "run_name": "tiny-lora"}
    overrides = ["model=tiny", "+tags=[a, 'b c']"]
    script = tmp_path / "run" / "slurm.sbatch"
    script.parent.mkdir()
    script.write_text(render_sbatch(cfg, overrides, python=str(fake), run_dir=script.parent))

    info = submit_and_wait(cluster, script, JOB_TIMEOUT)
    log = Path(info["StdOut"]).read_text()
    assert info["JobState"] == "COMPLETED", f"{info}\n{log}"
    assert info["JobName"] == "tiny-lora" and info["Requeue"] == "1"
    assert info["StdOut"] == str(script.parent / f"slurm-{info['JobId']}.out")
    for rank in (0, 1):
        argv = (tmp_path / f"argv.{rank}").read_text().splitlines()
        assert argv == ["-m", "acestep_train", *overrides, f"hydra.run.dir={script.parent}"]
        assert (tmp_path / f"env.{rank}").read_text().split() == [str(rank), "2", "2", "1"]


SWEEP_APP = """\
import json, os, hydra

@hydra.main(config_path="conf", config_name="train", version_base="1.3")
def main(cfg):
    rank = os.environ["SLURM_PROCID"]
    with open(os.path.join(cfg.out, f"x{cfg.x}.rank{rank}.json"), "w") as f:
        json.dump({k: os.environ.get(k) for k in ("SLURM_NTASKS", "SLURM_NTASKS_PER_NODE")}, f)

if __name__ == "__main__":
    main()
"""


def test_submitit_launcher_sweep(cluster, tmp_path):
    """conf/launcher/slurm.yaml drives a real Hydra -m sweep: one job per point, devices tasks each."""
    conf = tmp_path / "conf"
    (conf / "trainer").mkdir(parents=True)
    shutil.copytree(REPO / "acestep_train" / "conf" / "launcher", conf / "launcher")
    (conf / "train.yaml").write_text(
        f"defaults:\n  - _self_\n  - trainer: cpu\n  - launcher: local\nx: 0\nout: {tmp_path}\n"
    )
    (conf / "trainer" / "cpu.yaml").write_text("accelerator: cpu\ndevices: 2\nnum_nodes: 1\n")
    (tmp_path / "app.py").write_text(SWEEP_APP)
    cmd = [
        sys.executable, "app.py", "-m", "launcher=slurm", "x=1,2",
        "hydra.launcher.gpus_per_node=null", "hydra.launcher.cpus_per_task=1",
        f"hydra.sweep.dir={tmp_path}/sweep",
    ]  # fmt: skip
    proc = subprocess.run(cmd, cwd=tmp_path, env=cluster.env, capture_output=True, text=True, timeout=JOB_TIMEOUT)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for x in (1, 2):
        for rank in (0, 1):
            env = json.loads((tmp_path / f"x{x}.rank{rank}.json").read_text())
            assert env == {"SLURM_NTASKS": "2", "SLURM_NTASKS_PER_NODE": "2"}
