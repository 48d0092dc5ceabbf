"""CLI tier: every command in the README, run as a subprocess from an empty folder as a user would type it.

The commands are read from ``README.md`` (its ```` ```bash ```` blocks) when the tests are collected, so this tier
follows the README: a new command is run, a changed one is run as changed, and a command no rule covers fails.
What is substituted (only data paths, the model where the README names a released variant that needs a download,
and CPU stand-ins for GPU trainers), what is excluded (setup, the test command) and why: the docstring of
``tests/cli/readme_commands.py``.

Two flavours, each in its own empty workspace:
  * ``default``: the embedded default (``python -m acestep_train``, 40 steps on the demo data) is the base run;
    ``data.metadata=...`` becomes the demo clips' ``metadata.csv``.
  * ``fields``: the same clips listed in a CSV whose audio and caption columns are named ``file`` and ``caption``
    (DiffSynth's names), read with ``data.fields={audio: file, prompt: caption}``; the base run is the embedded
    default command with ``data=audio`` on that CSV and ``trainer.max_steps=2``.

The base run's ``last.ckpt`` is what the resume and export commands use, and its four exports (ours, PEFT folder,
ComfyUI, DiffSynth) are each passed to the ``generate ... adapters=`` command. Beyond the README: a ``-m`` sweep
of two points per flavour (the README's config table promises ``-m`` sweeps).
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

import readme_commands as rc
from readme_commands import FIELDS_OVERRIDE, Command, Flavour

ADAPTERS = {"acestep": "lora.safetensors", "peft": "peft", "comfyui": "lora_comfyui.safetensors",
            "diffsynth": "lora_diffsynth.safetensors"}


def _collect() -> list:
    """One pytest param per (flavour, README command); a command no rule covers becomes a failing param."""
    try:
        commands, _ = rc.readme_commands()
    except ValueError as err:
        return [pytest.param("default", None, None, str(err), id="unparsable-readme-command")]
    params = []
    for flavour in ("default", "fields"):
        for i, cmd in enumerate(commands):
            if flavour == "fields" and not (rc.uses_data(cmd) or rc.is_embedded_default(cmd)):
                continue  # the same command in both flavours; once is enough
            adapters = list(ADAPTERS) if any(a.startswith("adapters=") for a in cmd.args) else [None]
            for fmt in adapters:
                marks = []
                pid = f"{flavour}-{i:02d}-{_kind(cmd)}" + (f"-{fmt}" if fmt else "")
                params.append(pytest.param(flavour, cmd, fmt, None, id=pid, marks=marks))
    return params


def _is_resume(cmd: Command) -> bool:
    return cmd.kind == "train" and rc.SAME_OVERRIDES in cmd.args


def _kind(cmd: Command) -> str:
    if rc.is_embedded_default(cmd):
        return "embedded-default"
    if _is_resume(cmd):
        return "resume"
    words = [a.split("=", 1)[1] for a in cmd.args if a.startswith(("model=", "mode=", "experiment="))]
    return "-".join([cmd.kind, *words])


# ---- data and workspaces ------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tmp_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cli")


@pytest.fixture(scope="module")
def flavours(tmp_root) -> dict[str, Flavour]:
    from datamodules.demo import make_demo_dataset
    from user_env import renamed_columns_csv

    metadata = make_demo_dataset(tmp_root / "songs", n=4, seconds=3.0, seed=0)
    renamed = renamed_columns_csv(metadata)
    fields_base = ["data=audio", f"data.metadata={renamed}", FIELDS_OVERRIDE, "trainer.max_steps=2"]
    return {"default": Flavour("default", metadata),
            "fields": Flavour("fields", renamed, [FIELDS_OVERRIDE], fields_base)}


class BaseRuns:
    """The embedded-default command per flavour, run once in the flavour's empty workspace (lazily)."""

    def __init__(self, tmp_root: Path, flavours: dict[str, Flavour]):
        self.tmp_root, self.flavours, self.done = tmp_root, flavours, {}

    def workspace(self, flavour: str) -> Path:
        ws = self.tmp_root / f"workspace-{flavour}"
        ws.mkdir(exist_ok=True)
        return ws

    def get(self, flavour: str) -> dict:
        if flavour not in self.done:
            commands, _ = rc.readme_commands()
            default = next((c for c in commands if rc.is_embedded_default(c)), None)
            assert default is not None, "the README no longer shows the embedded default (`python -m acestep_train`)"
            ws = self.workspace(flavour)
            assert not any(ws.iterdir()), "the base run must start in an empty folder"
            result = rc.run(rc.argv(default, self.flavours[flavour].base_overrides), ws, self.tmp_root)
            new = sorted(rc.run_dirs(ws))
            run_dir = new[0] if len(new) == 1 else None
            exports = None
            if run_dir is not None and (run_dir / "exports").is_dir():
                exports = self.tmp_root / f"base-exports-{flavour}"  # the export command may overwrite the original
                shutil.copytree(run_dir / "exports", exports)
            self.done[flavour] = {"result": result, "run_dir": run_dir, "exports": exports}
        return self.done[flavour]


@pytest.fixture(scope="module")
def base_runs(tmp_root, flavours) -> BaseRuns:
    return BaseRuns(tmp_root, flavours)


def _base_ok(base: dict) -> dict:
    """The base run's outputs, or a failure that says the base run (not the command under test) broke."""
    assert base["result"].returncode == 0, "the base run failed:\n" + base["result"].explain()
    assert base["run_dir"] is not None, "the base run wrote no single outputs/<name>/<date> folder"
    return base


# ---- the README, command by command ---------------------------------------------------------------------------------

@pytest.mark.parametrize("flavour,cmd,fmt,parse_error", _collect())
def test_readme_command(flavour, cmd, fmt, parse_error, base_runs, flavours, tmp_root):
    assert parse_error is None, parse_error
    if rc.is_embedded_default(cmd):
        return _check_embedded_default(_base_ok(base_runs.get(flavour)))
    ws = base_runs.workspace(flavour)
    needs_base = _is_resume(cmd) or cmd.kind == "export" or fmt is not None
    base = _base_ok(base_runs.get(flavour)) if needs_base else None
    ckpt = base["run_dir"] / "checkpoints" / "last.ckpt" if base else None
    adapter = base["exports"] / ADAPTERS[fmt] if fmt else None
    args = rc.substitute(cmd, flavours[flavour], ckpt=ckpt, adapter=adapter)
    if cmd.kind == "submit":
        args.append("--dry-run")  # the README: "--dry-run prints it"; there is no cluster here
    if any(a.startswith("lyrics=@") for a in args):
        for a in args:
            if a.startswith("lyrics=@"):
                (ws / a.split("@", 1)[1]).write_text("[verse]\nla la la\n[chorus]\noh oh\n", encoding="utf-8")
    before_dirs, before_files = rc.run_dirs(ws), _files(ws)
    # A fresh feature cache per command (so that preprocess must write one).
    caches = tmp_root / "caches" / f"{flavour}-{hashlib.sha1(cmd.text.encode()).hexdigest()[:8]}-{fmt}"
    result = rc.run(rc.argv(cmd, args), ws, caches)
    assert result.returncode == 0, result.explain()
    new_dirs = rc.run_dirs(ws) - before_dirs
    CHECKS[cmd.kind if not _is_resume(cmd) else "resume"](
        result=result, ws=ws, new_dirs=new_dirs, args=args, before_files=before_files, base=base, caches=caches)


def _files(ws: Path) -> set[Path]:
    return {p for p in ws.rglob("*")}


def _check_embedded_default(base: dict) -> None:
    run_dir = base["run_dir"]
    assert run_dir.parent.parent.name == "outputs"
    assert (run_dir / "checkpoints" / "last.ckpt").is_file(), "no last.ckpt"
    assert sorted(p.name for p in base["exports"].iterdir()) == sorted(ADAPTERS.values())
    assert list((run_dir / "validation_audio").rglob("*.wav")), "no validation audio"
    assert list((run_dir / "validation_audio").rglob("*.png")), "no spectrograms"


def _check_train(result, new_dirs, **_):
    assert len(new_dirs) == 1, f"expected one new run folder, got {sorted(new_dirs)}\n{result.explain()}"
    run_dir = next(iter(new_dirs))
    assert (run_dir / "checkpoints" / "last.ckpt").is_file(), result.explain()
    assert (run_dir / "exports").is_dir(), result.explain()


def _check_resume(result, base, new_dirs, **kw):
    """The base run had finished, so the resumed run restores every state, trains no further step (hence writes
    no new checkpoint: the kill -9 tier covers resuming mid-run) and exports again in its own folder."""
    assert "Restored all states" in result.output, result.explain()
    assert "`Trainer.fit` stopped" in result.output, result.explain()
    assert len(new_dirs) == 1, f"expected one new run folder, got {sorted(new_dirs)}\n{result.explain()}"
    exports = next(iter(new_dirs)) / "exports"
    assert sorted(p.name for p in exports.iterdir()) == sorted(ADAPTERS.values()), result.explain()


def _check_preprocess(result, caches, **_):
    manifests = list((caches / "feature_cache").rglob("manifest-*.json"))
    assert manifests, "preprocess wrote no feature-cache manifest\n" + result.explain()


def _check_export(result, args, base, **_):
    formats = args[args.index("--formats") + 1:] if "--formats" in args else list(ADAPTERS)
    out = base["run_dir"] / "exports"
    for fmt in formats:
        assert (out / ADAPTERS[fmt]).exists(), f"{fmt} export missing\n{result.explain()}"


def _check_generate(result, ws, args, **_):
    out = next(a.split("=", 1)[1] for a in args if a.startswith("out="))
    wav = ws / out
    assert wav.is_file(), result.explain()
    audio, rate = sf.read(wav, always_2d=True)
    assert rate == 48000 and audio.shape[1] == 2
    assert np.isfinite(audio).all() and np.abs(audio).max() > 0, "non-finite or silent audio"
    assert wav.with_suffix(".json").is_file() and wav.with_suffix(".png").is_file()
    wav.unlink()  # the next format writes the same name


def _check_submit(result, ws, before_files, **_):
    assert "#SBATCH --nodes=2" in result.output and "#SBATCH --ntasks-per-node=8" in result.output, result.explain()
    assert "-m acestep_train" in result.output
    assert _files(ws) == before_files, "--dry-run wrote files"


CHECKS = {"train": _check_train, "resume": _check_resume, "preprocess": _check_preprocess, "export": _check_export,
          "generate": _check_generate, "submit": _check_submit}


# ---- beyond the README's code blocks: a -m sweep ----------------------------------------------------------------

@pytest.mark.parametrize("flavour", ["default", "fields"])
def test_multirun_sweep(flavour, flavours, tmp_root, base_runs):
    """``python -m acestep_train -m ... mode.lora.rank=2,4``: two runs, each with its checkpoint and exports."""
    ws = base_runs.workspace(flavour)
    overrides = [a for a in flavours[flavour].base_overrides if not a.startswith("trainer.max_steps=")]
    cmd = rc.Command("python -m acestep_train -m", "train", "acestep_train", [])
    result = rc.run(rc.argv(cmd, ["-m", *overrides, "trainer.max_steps=1", "mode.lora.rank=2,4"]), ws, tmp_root)
    assert result.returncode == 0, result.explain()
    points = sorted((ws / "multirun").glob("*/*/*/checkpoints/last.ckpt"))
    assert len(points) == 2, f"expected 2 sweep points, found {points}\n{result.explain()}"
