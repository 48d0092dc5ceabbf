"""A real single-node SLURM cluster (munged + slurmctld + slurmd) for tests.

    bash .ci/slurm-setup.sh          # once: installs the Debian slurm-wlm + munge packages
    with LocalSlurmCluster(tmp_path) as cluster:
        info = submit_and_wait(cluster, script, timeout=120)
        assert info["JobState"] == "COMPLETED"

Everything the cluster writes (rendered slurm.conf, state, logs, job-completion
records) lives under ``root``; sockets and the slurmd spool go to a short
``slurm-*`` directory under the system temp dir because Unix socket paths are limited to 108 bytes.
The daemons get their own MUNGE key and socket, so a system munged or
/etc/slurm is neither needed nor touched. Client commands must run with
``cluster.env`` (it sets ``SLURM_CONF``); ``cluster.run("sinfo")`` does that.

The config comes from ``tests/slurm_cluster/slurm.conf.template`` (a data directory
next to this module; Python still imports this file as ``slurm_cluster``
because a module beats a namespace directory of the same name).
"""

from __future__ import annotations

import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from string import Template

TEMPLATE_DIR = Path(__file__).resolve().parent / "slurm_cluster"
SLURM_CONF_TEMPLATE = TEMPLATE_DIR / "slurm.conf.template"

# JobState values after which a job will not run again by itself.
TERMINAL_STATES = frozenset(
    {
        "COMPLETED",
        "FAILED",
        "CANCELLED",
        "TIMEOUT",
        "NODE_FAIL",
        "OUT_OF_MEMORY",
        "BOOT_FAIL",
        "DEADLINE",
        "PREEMPTED",
    }
)
DAEMONS = ("slurmctld", "slurmd", "munged")
_CLIENTS = ("sbatch", "srun", "scontrol", "sinfo", "squeue", "scancel")
# Marks every process the cluster starts (and, through the job environment,
# every job task), so teardown can find stragglers by environment.
_MARKER = "ACESTEP_LOCAL_SLURM_ROOT"


class SlurmNotInstalled(RuntimeError):
    """slurmctld/slurmd/munged are not on this machine (run .ci/slurm-setup.sh)."""


def slurm_available() -> bool:
    """True when every binary the local cluster needs can be found."""
    return all(_which(b) for b in (*DAEMONS, *_CLIENTS))


def _which(name: str) -> str | None:
    # Debian puts the daemons in /usr/sbin, which is not on every PATH.
    return shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin:/usr/bin")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _memory_mb() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) // 1024
    return 1024


def parse_scontrol(text: str) -> dict[str, str]:
    """Parse one-line ``scontrol show job -o`` output into a dict.

    Values may contain spaces (``Reason``, ``Command``), so split only before
    ``Key=`` tokens.
    """
    fields: dict[str, str] = {}
    for part in re.split(r"\s+(?=[A-Za-z][A-Za-z0-9_:/]*=)", text.strip()):
        key, sep, value = part.partition("=")
        if sep:
            fields[key] = value
    return fields


class LocalSlurmCluster:
    """Context manager running munged, slurmctld and slurmd as plain child daemons.

    Args:
        root: directory for the rendered config, state save dir and logs
            (created; a pytest ``tmp_path`` is the intended value).
        cpus: CPUs declared for the node. Default ``max(2, os.cpu_count())``:
            ``SlurmdParameters=config_overrides`` lets a 1-CPU runner still host
            the 2-task test job.
        memory_mb: RealMemory declared for the node (default: MemTotal).
        partition: name of the (default) partition.
        start_timeout: seconds to wait for the node to report ``idle``.
    """

    def __init__(
        self,
        root: Path,
        *,
        cpus: int | None = None,
        memory_mb: int | None = None,
        partition: str = "debug",
        start_timeout: float = 60.0,
    ) -> None:
        self.root = Path(root).resolve()
        self.cpus = cpus or max(2, os.cpu_count() or 1)
        self.memory_mb = memory_mb or _memory_mb()
        self.partition = partition
        self.start_timeout = start_timeout
        self.hostname = socket.gethostname().split(".")[0]
        self.node = self.hostname
        self.conf_path = self.root / "slurm.conf"
        self.log_dir = self.root / "log"
        self.run_dir: Path | None = None  # short dir for sockets + spool
        self.env: dict[str, str] = {}
        self.startup_seconds: float | None = None
        self._procs: dict[str, subprocess.Popen] = {}

    # ---------------------------------------------------------------- lifecycle
    def __enter__(self) -> LocalSlurmCluster:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> None:
        """Render the config, start the three daemons, wait for an idle node."""
        missing = [b for b in (*DAEMONS, *_CLIENTS) if not _which(b)]
        if missing:
            raise SlurmNotInstalled(
                f"missing {', '.join(missing)}; run `bash .ci/slurm-setup.sh` (Debian: slurm-wlm munge)"
            )
        t0 = time.monotonic()
        try:
            self._render()
            self._start_munge()
            self._start_daemon("slurmctld", [_which("slurmctld"), "-D", "-i"])
            self._start_daemon("slurmd", [_which("slurmd"), "-D", "-N", self.node])
            self._wait_idle()
        except BaseException:
            self.stop()
            raise
        self.startup_seconds = time.monotonic() - t0

    def stop(self) -> None:
        """Cancel jobs, stop the daemons, kill any straggler job process, remove sockets."""
        if self._procs.get("slurmctld") and self._procs["slurmctld"].poll() is None:
            try:  # let SLURM end its jobs cleanly; whatever survives is killed below
                self.run("scancel", "--full", f"--partition={self.partition}", check=False, timeout=10)
                deadline = time.monotonic() + 15
                while time.monotonic() < deadline and self.run(
                    "squeue", "-h", "-o", "%i", check=False, timeout=10
                ).stdout.strip():
                    time.sleep(0.5)
            except (subprocess.TimeoutExpired, OSError):
                pass
        # slurmd first (it owns the job steps), munged last (the others need it to say goodbye).
        for name in ("slurmd", "slurmctld", "munged"):
            proc = self._procs.pop(name, None)
            if proc is not None:
                _terminate(proc)
        for pid in self.leftover_pids():
            _kill_pid(pid)
        if self.run_dir is not None:
            shutil.rmtree(self.run_dir, ignore_errors=True)
            self.run_dir = None

    @property
    def daemon_pids(self) -> dict[str, int]:
        """PIDs of the running daemons; each leads its own session (``pgrep -s PID``)."""
        return {name: proc.pid for name, proc in self._procs.items()}

    def leftover_pids(self) -> list[int]:
        """PIDs of live processes started by this cluster (daemons, slurmstepd, job tasks)."""
        marker = f"{_MARKER}={self.root}".encode()
        me = os.getpid()
        found = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit() or int(entry.name) == me:
                continue
            try:
                environ = (entry / "environ").read_bytes()
                status = (entry / "stat").read_text()
            except OSError:
                continue
            # A zombie is already dead; its parent (maybe us) just has not reaped it.
            state = status.rsplit(")", 1)[-1].split()[0] if ")" in status else ""
            if state != "Z" and marker in environ.split(b"\0"):
                found.append(int(entry.name))
        return found

    # ----------------------------------------------------------------- commands
    def run(
        self, *args: str, check: bool = True, timeout: float = 30, cwd: Path | str | None = None
    ) -> subprocess.CompletedProcess:
        """Run a SLURM client command (``sinfo``, ``sbatch``, …) against this cluster.

        Runs in ``cwd`` (default ``root``), which is also where a job submitted
        without ``--chdir``/``--output`` works and writes ``slurm-<id>.out``.
        """
        cmd = [_which(args[0]) or args[0], *args[1:]]
        proc = subprocess.run(
            cmd, env=self.env, capture_output=True, text=True, timeout=timeout, cwd=cwd or self.root
        )
        if check and proc.returncode != 0:
            raise RuntimeError(
                f"{' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}{proc.stderr}\n{self.log_tail()}"
            )
        return proc

    def sbatch(self, script: Path | str, *args: str, cwd: Path | str | None = None) -> int:
        """Submit a batch script (extra sbatch ``args`` go before it); return its job id."""
        out = self.run("sbatch", "--parsable", *args, str(script), cwd=cwd).stdout.strip()
        return int(out.split(";")[0])

    def job_info(self, job_id: int) -> dict[str, str]:
        """``scontrol show job`` fields (JobState, ExitCode, Restarts, NodeList, …)."""
        proc = self.run("scontrol", "show", "job", "-o", str(job_id))
        return parse_scontrol(proc.stdout)

    def wait_for_job(
        self, job_id: int, timeout: float, states: frozenset[str] | set[str] = TERMINAL_STATES
    ) -> dict[str, str]:
        """Poll until the job's state is in ``states``; raise TimeoutError with logs otherwise."""
        deadline = time.monotonic() + timeout
        info: dict[str, str] = {}
        while time.monotonic() < deadline:
            info = self.job_info(job_id)
            if info.get("JobState") in states:
                return info
            time.sleep(0.5)
        raise TimeoutError(f"job {job_id} not in {sorted(states)} after {timeout}s: {info}\n{self.log_tail()}")

    def log_tail(self, lines: int = 15) -> str:
        """Last lines of every daemon log, for error messages."""
        out = []
        for log in sorted(self.log_dir.glob("*.log")):
            text = log.read_text(errors="replace").splitlines()[-lines:]
            out.append(f"--- {log.name}\n" + "\n".join(text))
        return "\n".join(out)

    # ---------------------------------------------------------------- internals
    def _render(self) -> None:
        for sub in ("state", "log"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        self.run_dir = Path(tempfile.mkdtemp(prefix="slurm-"))
        # munged wants its socket reachable by everyone (the key itself stays 0400).
        self.run_dir.chmod(0o755)
        (self.run_dir / "spool").mkdir()
        (self.run_dir / "munge").mkdir(mode=0o755)
        user = pwd.getpwuid(os.geteuid()).pw_name  # not $USER: it can lie under su/setpriv
        text = Template(SLURM_CONF_TEMPLATE.read_text()).substitute(
            hostname=self.hostname,
            addr="127.0.0.1",
            node=self.node,
            cpus=self.cpus,
            memory_mb=self.memory_mb,
            partition=self.partition,
            ctld_port=_free_port(),
            slurmd_port=_free_port(),
            user=user,
            root=self.root,
            run=self.run_dir,
            munge_socket=self.run_dir / "munge" / "munge.socket",
        )
        # The template's paths that need to be short (sockets) use ${run}.
        self.conf_path.write_text(text)
        (self.root / "plugstack.conf").write_text("")
        self.env = {
            **os.environ,
            "SLURM_CONF": str(self.conf_path),
            _MARKER: str(self.root),
            "PATH": os.environ.get("PATH", "/usr/bin:/bin") + ":/usr/sbin:/sbin",
        }
        # Do not let an enclosing allocation leak into our clients and jobs.
        for key in list(self.env):
            if key.startswith(("SLURM_", "SBATCH_", "SRUN_", "SALLOC_")) and key != "SLURM_CONF":
                del self.env[key]

    def _start_munge(self) -> None:
        mdir = self.run_dir / "munge"
        key = mdir / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        cmd = [
            _which("munged"),
            "--foreground",
            "--force",  # root + /tmp parents would otherwise be refused as "insecure"
            f"--socket={mdir / 'munge.socket'}",
            f"--key-file={key}",
            f"--pid-file={mdir / 'munged.pid'}",
            f"--seed-file={mdir / 'munged.seed'}",
            f"--log-file={self.log_dir / 'munged.log'}",
        ]
        self._start_daemon("munged", cmd)
        _wait_for(lambda: (mdir / "munge.socket").exists(), 15, "munged socket", self)

    def _start_daemon(self, name: str, cmd: list[str]) -> None:
        out = open(self.log_dir / f"{name}.stdout", "ab")
        self._procs[name] = subprocess.Popen(
            cmd,
            env=self.env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # own process group: teardown kills the whole group
            preexec_fn=_die_with_parent,
        )
        out.close()

    def _wait_idle(self) -> None:
        def idle() -> bool:
            for name, proc in self._procs.items():
                if proc.poll() is not None:
                    raise RuntimeError(f"{name} exited with {proc.returncode}\n{self.log_tail()}")
            res = self.run("sinfo", "-h", "-N", "-o", "%t", check=False, timeout=10)
            return res.returncode == 0 and res.stdout.strip() == "idle"

        _wait_for(idle, self.start_timeout, "node idle in sinfo", self)


def _die_with_parent() -> None:
    """In the child before exec: SIGKILL it if the process that started it dies.

    Keeps a killed pytest run from leaving daemons behind (Linux only; best effort).
    """
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except Exception:
        pass


def _wait_for(pred, timeout: float, what: str, cluster: LocalSlurmCluster) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(0.2)
    raise TimeoutError(f"timed out after {timeout}s waiting for {what}\n{cluster.log_tail()}")


def _terminate(proc: subprocess.Popen, grace: float = 10.0) -> None:
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # daemon's own group: stragglers it forked
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()


def _kill_pid(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def submit_and_wait(
    cluster: LocalSlurmCluster, script_path: Path | str, timeout: float, *sbatch_args: str
) -> dict[str, str]:
    """Submit ``script_path`` with sbatch and block until the job reaches a terminal state.

    Returns the ``scontrol show job`` fields (``JobId``, ``JobState``, ``ExitCode``,
    ``Restarts``, ``StdOut``, …). Raises TimeoutError (with daemon log tails) if the
    job is not finished within ``timeout`` seconds.
    """
    job_id = cluster.sbatch(script_path, *sbatch_args)
    return cluster.wait_for_job(job_id, timeout)
