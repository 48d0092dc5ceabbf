"""The environment of a command a test runs as a user would: this checkout first on the path, and every cache
(features, model downloads, torch.hub's URL downloads) inside the test's own folder, so nothing is shared between
tests or left behind."""

from __future__ import annotations

import os
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def user_env(tmp: Path, **extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [env.get("PYTHONPATH")])])
    env["ACESTEP_DATA_CACHE"] = str(tmp / "feature_cache")
    env["ACESTEP_MODEL_CACHE"] = str(tmp / "model_cache")
    env["TORCH_HOME"] = str(tmp / "torch_home")  # torch.hub caches URL downloads there, by file name
    env["TOKENIZERS_PARALLELISM"] = "false"
    env.update(extra)
    return env


def renamed_columns_csv(metadata: Path) -> Path:
    """A copy of ``metadata`` whose audio and caption columns carry DiffSynth's names (``file``, ``caption``): the
    dataset a user points ``data.fields={audio: file, prompt: caption}`` at."""
    import csv

    renamed = metadata.with_name("renamed_columns.csv")
    with metadata.open(newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f))
    rows[0] = [{"audio": "file", "prompt": "caption"}.get(c, c) for c in rows[0]]
    with renamed.open("w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows(rows)
    return renamed
