"""The README's shell commands, parsed and made runnable in a test workspace.

Read by ``test_readme_commands.py``. Every rule the tier applies lives in a table here, so that when the README
changes the tier follows it, and a README command no rule covers fails the tier instead of being skipped.

Rules, in order:

1. **Which commands.** Every line of every fenced ```` ```bash ```` block of ``README.md``; ``\\``-continued lines
   are joined, ``#`` comments dropped, and ``a && b`` is split into its commands.
2. **Excluded by rule** (``EXCLUDED``): environment setup (``python3 -m venv``, ``pip install``,
   ``bash .ci/slurm-setup.sh``) — the tests already run inside an installed environment — and the test command
   itself (``-m pytest``), which would recurse.
3. **Programs** (``PROGRAMS``): ``python``, ``python3`` and ``.venv/bin/python`` become the interpreter running the
   tests. A console script (``acestep-train``, ``acestep-generate``, ...) runs from the interpreter's ``bin/`` when
   installed there, else as its ``python -m <module>`` equivalent.
4. **Substitutions** (``substitute``), and nothing else:

   ======================================  ===================================================================
   README text                             replaced by
   ======================================  ===================================================================
   ``data.metadata=<any>``                 the test's metadata file (the demo clips); in the ``fields`` flavour
                                           a copy whose columns are named ``file``/``caption``, plus
                                           ``data.fields={audio: file, prompt: caption}``
   ``<same overrides>``                    the overrides of the run being resumed (the flavour's)
   ``outputs/.../checkpoints/last.ckpt``   the ``last.ckpt`` of the flavour's base run (positional or
                                           ``ckpt_path=``)
   ``path: exports/<file>`` in adapters    each of the four files/folders the base run exported, in turn
   ``model=<released variant>``            ``model=tiny`` where the command loads weights (train, preprocess,
                                           generate); kept where it only composes a config (``submit``)
   ``experiment=<name>``                   kept, plus ``model=tiny`` (the experiment picks a released model)
   ``trainer=gpu`` / ``ddp`` without CUDA  kept, plus ``trainer.accelerator=cpu trainer.precision=32-true``
                                           and ``trainer.devices=1`` (one CPU process)
   a training command with overrides       ``+ trainer.max_steps=2`` (time); the embedded default runs as is
   ``lyrics=@lyrics.txt``                  kept; the test writes ``lyrics.txt`` into the workspace first
   ======================================  ===================================================================

5. **Environment**: ``PYTHONPATH`` starts with this checkout (so a subprocess imports these files, not another
   install), and the model/feature caches (``ACESTEP_MODEL_CACHE``, ``ACESTEP_DATA_CACHE``) point into the test's
   temporary folder, so nothing is written to ``$HOME``.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
README = REPO / "README.md"

EXCLUDED = [
    (r"^python3? -m venv\b", "setup: creates the environment the tests already run in"),
    (r"\bpip install\b", "setup: installs the package the tests already import"),
    (r"^bash \.ci/slurm-setup\.sh\b", "setup: installs SLURM (CI's job, not a user path)"),
    (r"\s-m pytest\b", "the test command itself"),
]

# program -> kind; console scripts map to the module they wrap.
MODULES = {
    "acestep_train": "train",
    "acestep_train.training.preprocess": "preprocess",
    "acestep_train.training.export": "export",
    "acestep_train.inference.generate": "generate",
    "acestep_train.launch.submit": "submit",
}
CONSOLE_SCRIPTS = {
    "acestep-train": "acestep_train",
    "acestep-preprocess": "acestep_train.training.preprocess",
    "acestep-export": "acestep_train.training.export",
    "acestep-generate": "acestep_train.inference.generate",
    "acestep-submit": "acestep_train.launch.submit",
}
PYTHONS = ("python", "python3", ".venv/bin/python")
# Released variants (need a download) -> the tiny model where a command loads weights.
LOADS_WEIGHTS = ("train", "preprocess", "generate")
FIELDS_OVERRIDE = "data.fields={audio: file, prompt: caption}"
CPU_TRAINER = ["trainer.accelerator=cpu", "trainer.precision=32-true", "trainer.devices=1"]
SAME_OVERRIDES = "__SAME_OVERRIDES__"


@dataclass
class Command:
    """One README command: the text as written, the program kind and its arguments."""

    text: str
    kind: str
    module: str
    args: list[str]
    script: str | None = None  # the console-script name, when the README uses one

    @property
    def id(self) -> str:
        words = [a for a in self.args if "=" in a and not a.startswith(("data.metadata", "ckpt_path", "prompt"))]
        key = re.sub(r"[^A-Za-z0-9=._-]+", "_", " ".join(words[:3]))[:60]
        return f"{self.kind}[{key or 'default'}]"


@dataclass
class Flavour:
    """A data setup the commands run against: its metadata file, extra data overrides and the base run's args."""

    name: str
    metadata: Path
    data_overrides: list[str] = field(default_factory=list)  # appended after data.metadata=
    base_overrides: list[str] = field(default_factory=list)  # the flavour's embedded-default run


def readme_lines(text: str) -> list[str]:
    """Every command line of every ```bash block (continuations joined, comments dropped)."""
    lines = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        joined = block.replace("\\\n", " ")
        for line in joined.splitlines():
            line = line.strip()
            if line and not line.startswith("#"):
                lines.extend(part.strip() for part in line.split("&&") if part.strip())
    return lines


def excluded_reason(line: str) -> str | None:
    for pattern, reason in EXCLUDED:
        if re.search(pattern, line):
            return reason
    return None


def parse(line: str) -> Command:
    """A README command line -> :class:`Command`; raises ``ValueError`` for a program no rule covers."""
    tokens = shlex.split(line.replace("<same overrides>", SAME_OVERRIDES))
    head = tokens[0]
    if head in CONSOLE_SCRIPTS:
        module, args, script = CONSOLE_SCRIPTS[head], tokens[1:], head
    elif head in PYTHONS and len(tokens) >= 3 and tokens[1] == "-m":
        module, args, script = tokens[2], tokens[3:], None
    else:
        raise ValueError(f"README command {line!r}: no rule in tests/cli/readme_commands.py says how to run it")
    if module not in MODULES:
        raise ValueError(f"README command {line!r}: unknown module {module!r}; add it to MODULES")
    return Command(line, MODULES[module], module, args, script)


def readme_commands(readme: Path = README) -> tuple[list[Command], list[tuple[str, str]]]:
    """(commands to run, [(excluded line, reason)])."""
    run, excluded = [], []
    for line in readme_lines(readme.read_text(encoding="utf-8")):
        reason = excluded_reason(line)
        if reason:
            excluded.append((line, reason))
        else:
            run.append(parse(line))
    return run, excluded


def is_embedded_default(cmd: Command) -> bool:
    return cmd.kind == "train" and not cmd.args


def uses_data(cmd: Command) -> bool:
    """Commands whose outcome depends on the data flavour (run for every flavour; the others once)."""
    return any(a.startswith("data.metadata=") or a == SAME_OVERRIDES for a in cmd.args) or cmd.kind == "export"


def has_cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


def substitute(cmd: Command, flavour: Flavour, ckpt: Path | None = None, adapter: Path | None = None) -> list[str]:
    """The command's arguments with the substitutions of the module docstring applied."""
    out: list[str] = []
    for arg in cmd.args:
        if arg == SAME_OVERRIDES:
            out += flavour.base_overrides
        elif arg.startswith("data.metadata="):
            out += [f"data.metadata={flavour.metadata}", *flavour.data_overrides]
        elif "..." in arg and arg.endswith(".ckpt"):
            if ckpt is None:
                raise ValueError(f"{cmd.text!r} needs a checkpoint")
            out.append(f"ckpt_path={ckpt}" if arg.startswith("ckpt_path=") else str(ckpt))
        elif arg.startswith("adapters=") and adapter is not None:
            out.append(re.sub(r"path:\s*[^,}\s]+", f"path: {adapter}", arg))
        elif arg.startswith("model=") and cmd.kind in LOADS_WEIGHTS:
            out.append("model=tiny")
        elif arg.startswith("trainer.devices=") and cmd.kind == "train" and not has_cuda():
            continue  # CPU_TRAINER sets it
        else:
            out.append(arg)
    if cmd.kind in LOADS_WEIGHTS and any(a.startswith("experiment=") for a in out):
        out.append("model=tiny")
    if cmd.kind == "train" and not has_cuda() and any(a in ("trainer=gpu", "trainer=ddp") or
                                                       a.startswith("experiment=") for a in out):
        out += CPU_TRAINER
    if cmd.kind == "train" and cmd.args and SAME_OVERRIDES not in cmd.args:
        out.append("trainer.max_steps=2")
    return out


def argv(cmd: Command, args: list[str]) -> list[str]:
    """The process to start: the console script when installed beside the interpreter, else ``python -m``."""
    if cmd.script:
        script = Path(sys.executable).parent / cmd.script
        if script.is_file() and os.access(script, os.X_OK):
            return [str(script), *args]
        found = shutil.which(cmd.script)
        if found:
            return [found, *args]
    return [sys.executable, "-m", cmd.module, *args]


def env(tmp: Path) -> dict[str, str]:
    e = dict(os.environ)
    e["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [e.get("PYTHONPATH")])])
    e["ACESTEP_MODEL_CACHE"] = str(tmp / "model_cache")
    e["TORCH_HOME"] = str(tmp / "torch_home")  # torch.hub caches URL downloads there
    e["ACESTEP_DATA_CACHE"] = str(tmp / "feature_cache")
    e.setdefault("TOKENIZERS_PARALLELISM", "false")
    return e


@dataclass
class Result:
    argv: list[str]
    returncode: int
    output: str

    def explain(self) -> str:
        return f"$ {shlex.join(self.argv)}\nexit {self.returncode}\n{self.output[-6000:]}"


def run(argv_: list[str], cwd: Path, tmp: Path, timeout: float = 1800) -> Result:
    proc = subprocess.run(argv_, cwd=cwd, env=env(tmp), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, timeout=timeout)
    return Result(argv_, proc.returncode, proc.stdout)


def run_dirs(workspace: Path) -> set[Path]:
    """Hydra run folders under ``outputs/`` (``outputs/<run_name>/<date>``)."""
    return {p for p in (workspace / "outputs").glob("*/*") if p.is_dir()}
