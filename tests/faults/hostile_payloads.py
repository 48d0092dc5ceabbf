"""Pickle payloads that write a marker file when unpickled, dressed as the files the commands load."""

from __future__ import annotations

import http.server
import threading
from functools import partial
from pathlib import Path

import torch


class WritesMarker:
    """Unpickling this runs ``open(marker, 'w').write(...)``: any loader that unpickles it has executed code."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('payload executed')",))


def hostile_checkpoint(path: Path, marker: Path) -> Path:
    """A plausible Lightning checkpoint (state_dict, global_step, ...) carrying the payload."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": {}, "global_step": 0, "epoch": 0, "pytorch-lightning_version": "2.5.0",
                "loops": {}, "callbacks": {}, "optimizer_states": [], "lr_schedulers": [],
                "hyper_parameters": WritesMarker(marker)}, path)
    return path


def hostile_tensor_file(path: Path, marker: Path) -> Path:
    """A ``.pt``/``.bin`` tensor file (what ``silence_latent.pt`` or ``adapter_model.bin`` hold) with the payload."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"latent": torch.zeros(1, 8, 4), "extra": WritesMarker(marker)}, path)
    return path


class FileServer:
    """``http://127.0.0.1:<port>/<name>`` for the files in a folder, while in a ``with`` block."""

    def __init__(self, folder: Path):
        handler = partial(_QuietHandler, directory=str(folder))
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/{name}"

    def __enter__(self) -> "FileServer":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass
