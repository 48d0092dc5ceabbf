"""The README's Python API block runs as written (in a fresh interpreter, from an empty folder)."""

import re
import subprocess
import sys
from pathlib import Path

README = Path(__file__).resolve().parents[2] / "README.md"


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_has_a_python_block():
    assert python_blocks(), "README.md lost its Python API example"


def test_readme_python_api_runs(tmp_path):
    code = python_blocks()[0] + (
        "\nassert audio.shape[0] == 2 and audio.shape[1] == 8 * 48000, audio.shape"
        "\nassert torch.isfinite(audio).all()\nprint('ok', tuple(audio.shape))\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "ok (2, 384000)" in proc.stdout
    assert not list(tmp_path.iterdir()), "the API example wrote into the working directory"
