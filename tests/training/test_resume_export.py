"""Checkpoints hold only plain data, so resume and export (both ``torch.load(weights_only=True)``) work on the
embedded default and on a ``data.fields`` config; ``ckpt_path`` is checked before anything heavy (no URLs: a remote
pickle is never loaded, let alone run); saved files get the user's umask."""

from __future__ import annotations

import csv
import functools
import http.server
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

from acestep_train.training.checks import StartupCheckError
from datamodules.demo import make_demo_dataset
from train_helpers import compose_train, run_train, tiny_overrides

REPO = Path(__file__).resolve().parents[2]
QUICK = ["callbacks.validation_audio=null", "trainer.enable_progress_bar=false", "logger=[csv]"]


def cli_env(tmp_path: Path) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests")]), "OMP_NUM_THREADS": "1",
            "ACESTEP_DATA_CACHE": str(tmp_path / "cache"), "TOKENIZERS_PARALLELISM": "false"}


def cli(tmp_path: Path, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    """A command exactly as a user types it, from an empty directory."""
    cwd = tmp_path / "cwd"
    cwd.mkdir(exist_ok=True)
    return subprocess.run([sys.executable, *args], cwd=cwd, env=cli_env(tmp_path), capture_output=True, text=True,
                          timeout=timeout)


def loads_weights_only(ckpt: Path) -> dict:
    return torch.load(ckpt, map_location="cpu", weights_only=True)


def test_embedded_default_resumes_and_exports(tmp_path):
    """``python -m acestep_train`` (demo data: a nested ``data.demo`` mapping), then resume from its ``last.ckpt``
    and export it, as the README says."""
    run = tmp_path / "run"
    first = cli(tmp_path, "-m", "acestep_train", f"hydra.run.dir={run}", "trainer.max_epochs=1", *QUICK)
    assert first.returncode == 0, first.stderr[-4000:]
    last = run / "checkpoints" / "last.ckpt"
    state = loads_weights_only(last)  # the old code: UnpicklingError ... DictConfig
    assert state["global_step"] == 4 and isinstance(state["datamodule_hyper_parameters"]["demo"], dict)

    second = cli(tmp_path, "-m", "acestep_train", f"hydra.run.dir={run}", f"ckpt_path={last}",
                 "trainer.max_epochs=2", *QUICK)
    assert second.returncode == 0, second.stderr[-4000:]
    assert f"Restoring states from the checkpoint path at {last}" in second.stdout + second.stderr
    assert loads_weights_only(last)["global_step"] == 8
    assert [p.name for p in last.parent.iterdir()] == ["last.ckpt"]  # overwritten, never last-v1.ckpt

    out = tmp_path / "exported"
    exp = cli(tmp_path, "-m", "acestep_train.training.export", str(last), "--out", str(out))
    assert exp.returncode == 0, exp.stderr[-4000:]
    assert (out / "lora.safetensors").is_file() and (out / "peft" / "adapter_model.safetensors").is_file()


def caption_dataset(root: Path) -> Path:
    """The demo data with its ``prompt`` column named ``caption`` (needs ``data.fields``)."""
    meta = make_demo_dataset(root, n=4, seconds=3.0, seed=1)
    rows = list(csv.reader(open(meta)))
    rows[0] = ["caption" if c == "prompt" else c for c in rows[0]]
    with open(meta, "w", newline="") as f:
        csv.writer(f).writerows(rows)
    return meta


def test_data_fields_run_resumes_and_exports(tmp_path):
    from acestep_train.training.export import main as export_main

    data = {"metadata": caption_dataset(tmp_path / "songs"), "cache": tmp_path / "cache"}
    over = tiny_overrides(data, ["data.fields={prompt: caption}", "trainer.max_steps=2", "exports=[acestep]"])
    run_train(tmp_path / "run", over)
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    assert loads_weights_only(last)["datamodule_hyper_parameters"]["fields"] == {"prompt": "caption"}

    run_train(tmp_path / "run", [o for o in over if not o.startswith("trainer.max_steps")]
              + ["trainer.max_steps=3", f"ckpt_path={last}"])
    assert loads_weights_only(last)["global_step"] == 3
    export_main([str(last), "--formats", "acestep", "--out", str(tmp_path / "exported")])
    assert (tmp_path / "exported" / "lora.safetensors").is_file()


def test_checkpoint_writer_refuses_what_weights_only_loading_would(tmp_path):
    from omegaconf import OmegaConf

    from acestep_train.training.atomic_checkpoint import AtomicCheckpointIO, NotPlainDataError

    io = AtomicCheckpointIO()
    io.save_checkpoint({"state_dict": {"w": torch.ones(2)}, "hp": {"fields": {"a": 1}}}, tmp_path / "ok.ckpt")
    assert loads_weights_only(tmp_path / "ok.ckpt")["hp"] == {"fields": {"a": 1}}
    with pytest.raises(NotPlainDataError, match=r"checkpoint\.hp\.fields: omegaconf\.dictconfig\.DictConfig"):
        io.save_checkpoint({"hp": {"fields": OmegaConf.create({"a": 1})}}, tmp_path / "bad.ckpt")
    assert not (tmp_path / "bad.ckpt").exists() and os.listdir(tmp_path) == ["ok.ckpt"]  # no temp file left


class _Payload:
    """Unpickling this runs ``touch <marker>``."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.fixture
def evil_server(tmp_path):
    """A local HTTP server whose only file is a checkpoint that, once unpickled, writes ``marker``."""
    served, marker = tmp_path / "served", tmp_path / "PWNED"
    served.mkdir()
    torch.save({"state_dict": {}, "x": _Payload(marker)}, served / "evil.ckpt")
    requests = []

    class Handler(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            requests.append(self.path)

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0),
                                             functools.partial(Handler, directory=str(served)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/evil.ckpt", marker, requests
    finally:
        server.shutdown()


def test_remote_ckpt_path_is_refused_and_never_unpickled(evil_server, tmp_path):
    url, marker, requests = evil_server
    data = {"metadata": make_demo_dataset(tmp_path / "songs", n=2, seconds=2.0), "cache": tmp_path / "cache"}
    with pytest.raises(StartupCheckError, match=r"ckpt_path=http://127\.0\.0\.1:\d+/evil\.ckpt: remote checkpoints"):
        run_train(tmp_path / "run", tiny_overrides(data, [f"ckpt_path={url}", "trainer.max_steps=1"]))
    assert not marker.exists() and requests == []
    # negative control: the payload is live (this is what a weights_only=False load of the URL would do)
    import urllib.request

    with urllib.request.urlopen(url) as r:
        (tmp_path / "copy.ckpt").write_bytes(r.read())
    torch.load(tmp_path / "copy.ckpt", weights_only=False)
    assert marker.exists()


def test_remote_ckpt_path_cli_one_error_line(evil_server, tmp_path):
    url, marker, _ = evil_server
    proc = cli(tmp_path, "-m", "acestep_train", f"hydra.run.dir={tmp_path / 'run'}", f"ckpt_path={url}", *QUICK)
    assert proc.returncode == 2, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "remote checkpoints are not loaded" in errors[0] and "Traceback" not in proc.stderr
    assert not marker.exists()


def test_missing_ckpt_path_is_reported_before_model_load_and_cache(tmp_path, monkeypatch):
    from acestep_train.training import train

    def no_model(*a, **k):
        raise AssertionError("the model was loaded before ckpt_path was checked")

    monkeypatch.setattr(train, "load_bundle", no_model)
    data = {"metadata": make_demo_dataset(tmp_path / "songs", n=2, seconds=2.0), "cache": tmp_path / "cache"}
    missing = tmp_path / "nope" / "last.ckpt"
    with pytest.raises(StartupCheckError, match=f"ckpt_path={missing}: no such checkpoint"):
        train.run(compose_train(tmp_path / "run", tiny_overrides(data, [f"ckpt_path={missing}"])))
    assert not (tmp_path / "cache").exists()


def test_written_files_follow_the_umask(tmp_path):
    from acestep_train.checkpoints.atomic import atomic_path, atomic_write
    from acestep_train.checkpoints.checkpoint_io import save_safetensors_atomic
    from acestep_train.training.atomic_checkpoint import AtomicCheckpointIO

    old = os.umask(0o027)
    try:
        save_safetensors_atomic({"w": torch.ones(2)}, tmp_path / "a.safetensors")  # safetensors alone: 0600
        AtomicCheckpointIO().save_checkpoint({"w": torch.ones(2)}, tmp_path / "b.ckpt")
        with atomic_write(tmp_path / "c.json", "w") as f:
            f.write("{}")
        with pytest.raises(RuntimeError):
            with atomic_path(tmp_path / "d.bin") as tmp:
                tmp.write_bytes(b"half")
                raise RuntimeError("crash mid-write")
    finally:
        os.umask(old)
    modes = {p.name: p.stat().st_mode & 0o777 for p in tmp_path.iterdir()}
    assert modes == {"a.safetensors": 0o640, "b.ckpt": 0o640, "c.json": 0o640}  # d.bin: never half-written
