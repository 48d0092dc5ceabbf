"""``pip install .`` (not editable) gives a working product: the wheel ships conf/ and the sbatch template, and from
``/`` (no checkout anywhere on the path) the entry points train --help, generate a tiny track, submit --dry-run;
the five console scripts are declared and their wrappers run."""

import importlib.metadata
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPTS = {"acestep-train": "acestep_train.training.train:main",
           "acestep-generate": "acestep_train.inference.generate:main",
           "acestep-preprocess": "acestep_train.training.preprocess:main",
           "acestep-export": "acestep_train.training.export:main",
           "acestep-submit": "acestep_train.launch.submit:main"}

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> dict:
    """Build a wheel from a copy of the sources (the build writes nothing into the checkout) and install it."""
    # The build runs without isolation, with this environment's setuptools (the dev extra asks for >= 70.1, the first
    # that builds wheels without the separate `wheel` package).
    setuptools = pytest.importorskip("setuptools")
    if tuple(int(x) for x in setuptools.__version__.split(".")[:2]) < (70, 1):
        pytest.skip(f"setuptools {setuptools.__version__} < 70.1 cannot build a wheel by itself: "
                    "pip install -c constraints.txt -e '.[dev]'")
    root = tmp_path_factory.mktemp("pkg")
    src = root / "src"
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in ("acestep_train", "datamodules"):
        shutil.copytree(REPO / name, src / name, ignore=ignore)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, src / name)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(root / "wheel"), str(src)],
                   check=True, capture_output=True, text=True, timeout=600)
    (wheel,) = (root / "wheel").glob("acestep_train-*.whl")
    target = root / "site"
    subprocess.run([*pip, "install", "--no-deps", "--target", str(target), str(wheel)], check=True,
                   capture_output=True, text=True, timeout=600)
    return {"wheel": wheel, "site": target, "root": root}


def run_from_root(installed, args: list[str], **kw) -> subprocess.CompletedProcess:
    """Run with only the installed copy importable (PYTHONPATH replaced, not extended), from /."""
    env = {**os.environ, "PYTHONPATH": str(installed["site"]), "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore",
           "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.run(args, cwd="/", env=env, capture_output=True, text=True, timeout=600, **kw)


def test_wheel_ships_the_configs_and_the_sbatch_template(installed):
    names = set(zipfile.ZipFile(installed["wheel"]).namelist())
    conf = REPO / "acestep_train" / "conf"
    expected = {f"acestep_train/conf/{p.relative_to(conf)}" for p in conf.rglob("*.yaml")}
    assert expected and expected <= names, sorted(expected - names)
    assert "acestep_train/launch/slurm.sbatch.template" in names


def test_installed_package_is_the_one_imported(installed):
    proc = run_from_root(installed, [sys.executable, "-c", "import acestep_train; print(acestep_train.__file__)"])
    assert proc.returncode == 0, proc.stderr
    assert Path(proc.stdout.strip()).is_relative_to(installed["site"])


def test_entry_points_work_from_root(installed):
    py = sys.executable
    proc = run_from_root(installed, [py, "-m", "acestep_train", "--help"])
    assert proc.returncode == 0 and "model: base, sft, tiny" in proc.stdout, proc.stderr[-2000:]

    out = installed["root"] / "gen" / "song.wav"
    proc = run_from_root(installed, [py, "-m", "acestep_train.inference.generate", "model=tiny", "prompt=x",
                                     "duration=2", "progress=false", f"out={out}"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert sorted(p.name for p in out.parent.iterdir()) == ["song.json", "song.png", "song.wav"]

    run_dir = installed["root"] / "slurm_run"
    proc = run_from_root(installed, [py, "-m", "acestep_train.launch.submit", "trainer.devices=2",
                                     f"hydra.run.dir={run_dir}", "--dry-run"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "#SBATCH" in proc.stdout and not run_dir.exists()  # a dry run writes nothing


def test_console_scripts_are_declared_and_their_wrappers_run(installed):
    (dist,) = [d for d in importlib.metadata.distributions(path=[str(installed["site"])])
               if d.metadata["Name"] == "acestep-train"]
    declared = {ep.name: ep.value for ep in dist.entry_points.select(group="console_scripts")}
    assert declared == SCRIPTS
    for script in SCRIPTS:  # pip's generated wrapper imports the entry point and calls it
        proc = run_from_root(installed, [str(installed["site"] / "bin" / script), "--help"])
        assert proc.returncode == 0, f"{script}: {proc.stderr[-2000:]}"
        assert "usage" in proc.stdout.lower() or "Configuration groups" in proc.stdout, script
