import os
from pathlib import Path

import pytest
import torch

from acestep_train.checkpoints import MANIFEST_DIR


@pytest.fixture(scope="session")
def manifests() -> Path:
    """The key manifests of the released files; shipped in the package, so no test skips for lack of them."""
    return MANIFEST_DIR


@pytest.fixture(autouse=True)
def _cwd_untouched(tmp_path_factory):
    """Tests must not write into the working directory."""
    before = set(os.listdir("."))
    yield
    after = set(os.listdir("."))
    created = sorted(after - before - {".pytest_cache", ".hypothesis", "__pycache__"})
    assert not created, f"test wrote into the working directory: {created}"


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
