"""Our safetensors reader checks every header entry against the file before it allocates anything: a crafted
header fails with one ``CheckpointError`` naming the file and the key, never with a huge allocation."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from acestep_train.checkpoints.checkpoint_io import CheckpointError, iter_safetensors, read_safetensors_header


def _craft(path: Path, header: dict, data: bytes = b"", header_len: int | None = None) -> Path:
    blob = json.dumps(header).encode()
    n = len(blob) if header_len is None else header_len
    path.write_bytes(struct.pack("<Q", n) + blob + data)
    return path


@pytest.fixture
def no_allocation(monkeypatch: pytest.MonkeyPatch) -> list:
    """Records every torch.empty the reader makes: a hostile header must be refused before the first one."""
    calls: list = []
    real = torch.empty

    def spy(*args, **kwargs):
        calls.append(args)
        return real(*args, **kwargs)

    monkeypatch.setattr(torch, "empty", spy)
    return calls


def _load(path: Path) -> dict:
    return dict(iter_safetensors([path]))


def test_a_well_formed_file_reads_like_the_safetensors_library(tmp_path: Path) -> None:
    tensors = {"a": torch.arange(12, dtype=torch.float32).reshape(3, 4), "b": torch.ones(2, dtype=torch.bfloat16),
               "empty": torch.zeros(0, 5), "flag": torch.tensor([True, False])}
    save_file(tensors, str(tmp_path / "ok.safetensors"))
    ours, theirs = _load(tmp_path / "ok.safetensors"), load_file(str(tmp_path / "ok.safetensors"))
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_header_length_beyond_the_file(tmp_path: Path, no_allocation: list) -> None:
    path = _craft(tmp_path / "m.safetensors", {"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}},
                  b"\0" * 4, header_len=1 << 40)
    with pytest.raises(CheckpointError, match=r"m\.safetensors: corrupt or truncated safetensors header "
                                              r"\(header length 1099511627776, file size \d+\)"):
        _load(path)
    assert no_allocation == []


def test_tensor_span_beyond_the_file(tmp_path: Path, no_allocation: list) -> None:
    # A consistent 4 TB tensor whose bytes are not in the 16-byte file: refused from sizes alone.
    path = _craft(tmp_path / "m.safetensors", {
        "ok": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
        "huge": {"dtype": "F32", "shape": [1 << 20, 1 << 20], "data_offsets": [16, 16 + (1 << 42)]}}, b"\0" * 16)
    with pytest.raises(CheckpointError, match=r"m\.safetensors: truncated: tensors need \d+ bytes, the file has "
                                              r"\d+ \(tensor 'huge' ends beyond it\)"):
        _load(path)
    assert no_allocation == []


def test_shape_that_disagrees_with_its_span(tmp_path: Path, no_allocation: list) -> None:
    # The old reader allocated torch.empty([2**20, 2**20]) (4 TiB) before comparing it with the 16-byte span.
    path = _craft(tmp_path / "m.safetensors",
                  {"w": {"dtype": "F32", "shape": [1 << 20, 1 << 20], "data_offsets": [0, 16]}}, b"\0" * 16)
    with pytest.raises(CheckpointError, match=r"m\.safetensors: tensor 'w': 16 bytes for shape \[1048576, 1048576\] "
                                              r"F32 \(which needs 4398046511104\)"):
        _load(path)
    assert no_allocation == []


def test_shape_product_that_overflows_int64(tmp_path: Path, no_allocation: list) -> None:
    # 2**32 * 2**32 * 4 bytes wraps to 0 in 64-bit arithmetic, which would "match" an empty span.
    path = _craft(tmp_path / "m.safetensors",
                  {"w": {"dtype": "F32", "shape": [1 << 32, 1 << 32], "data_offsets": [0, 0]}})
    with pytest.raises(CheckpointError, match=r"m\.safetensors: tensor 'w': 0 bytes for shape"):
        _load(path)
    assert no_allocation == []


@pytest.mark.parametrize("entry, problem", [
    ({"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}, "is not a list of non-negative integers"),
    ({"dtype": "F32", "shape": [1.5], "data_offsets": [0, 4]}, "is not a list of non-negative integers"),
    ({"dtype": "F32", "shape": [1], "data_offsets": [4, 0]}, r"data_offsets \[4, 0\] are not \[start, end\]"),
    ({"dtype": "F32", "shape": [1], "data_offsets": [0]}, "data_offsets"),
    ({"dtype": "X9", "shape": [1], "data_offsets": [0, 4]}, "unsupported dtype 'X9'"),
    ("not an object", "header entry is not an object"),
])
def test_malformed_entries_name_the_key(tmp_path: Path, no_allocation: list, entry, problem: str) -> None:
    path = _craft(tmp_path / "m.safetensors", {"layer.w": entry}, b"\0" * 4)
    with pytest.raises(CheckpointError, match=rf"m\.safetensors: tensor 'layer\.w'.*{problem}"):
        read_safetensors_header(path)
    assert no_allocation == []
