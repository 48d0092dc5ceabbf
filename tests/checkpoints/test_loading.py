"""A tiny checkpoint in the released layout loads through the user's code path, bit-exactly; bad inputs fail
with one clear message naming the file."""

import json
import os
import pickle
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from acestep_train import load_model
from acestep_train.checkpoints.checkpoint_io import CheckpointError, load_silence_latent
from acestep_train.checkpoints.loading import save_acestep_model, save_released_layout
from acestep_train.models import AceStepConfig, AceStepModel

SUB = "acestep-v15-turbo"


@pytest.fixture(scope="module")
def tiny():
    return load_model("tiny")


@pytest.fixture
def repo(tiny, tmp_path):
    """A released-layout repository holding the tiny model (DiT folder, vae/, Qwen3-Embedding-0.6B/)."""
    return save_released_layout(tiny, tmp_path / "Ace-Step1.5", SUB)


def load_from(repo: Path, **values):
    return load_model("tiny", source=str(repo), subfolder=SUB, **values)


def assert_same(a: torch.nn.Module, b: torch.nn.Module):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k


def test_released_layout_round_trips_bit_exactly(tiny, repo):
    names = sorted(p.name for p in (repo / SUB).iterdir())
    assert names == ["config.json", "model.safetensors", "silence_latent.pt"]
    assert (repo / "vae" / "diffusion_pytorch_model.safetensors").is_file()
    assert (repo / "Qwen3-Embedding-0.6B" / "tokenizer.json").is_file()
    stored = torch.load(repo / SUB / "silence_latent.pt", weights_only=True)
    assert list(stored.shape) == [1, tiny.config.audio_acoustic_hidden_dim, 15000]  # released orientation
    loaded = load_from(repo)
    assert_same(loaded.model, tiny.model)
    assert_same(loaded.vae, tiny.vae)
    assert_same(loaded.text_encoder, tiny.text_encoder)
    assert torch.equal(loaded.silence_latent, tiny.silence_latent)
    assert loaded.files["dit"] == str(repo / SUB)
    # The tokenizer came back too: identical ids for the same text.
    text = "# Caption\nhello<|endoftext|>"
    assert loaded.text_encoder.tokenizer(text)["input_ids"] == tiny.text_encoder.tokenizer(text)["input_ids"]


def test_sharded_checkpoint_loads(tiny, repo):
    shard_dir = repo / SUB
    (shard_dir / "model.safetensors").unlink()
    files = save_acestep_model(tiny.model, shard_dir, max_shard_bytes=200_000)
    assert len(files) > 2 and all(re.fullmatch(r"model-\d{5}-of-\d{5}\.safetensors", f.name) for f in files)
    (shard_dir / "model.safetensors").unlink(missing_ok=True)
    assert_same(load_from(repo).model, tiny.model)


def test_requested_dtype_is_applied(repo):
    loaded = load_from(repo, dtype="bfloat16")
    assert {p.dtype for p in loaded.model.decoder.parameters()} == {torch.bfloat16}


def test_missing_folder(tmp_path):
    with pytest.raises(CheckpointError, match=r"nope: no such folder, and not a modelscope model id"):
        load_model("tiny", source=str(tmp_path / "nope"), subfolder=SUB)


def test_missing_weights_file(repo):
    (repo / SUB / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match=rf"{SUB}: no model.safetensors or model-\*.safetensors shards"):
        load_from(repo)


def test_missing_vae_folder(repo):
    import shutil

    shutil.rmtree(repo / "vae")
    with pytest.raises(CheckpointError, match=r"vae: folder missing"):
        load_from(repo)


def test_truncated_safetensors(repo):
    path = repo / SUB / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 1000])
    with pytest.raises(CheckpointError, match=r"model.safetensors: truncated: tensors need \d+ bytes, the file has"):
        load_from(repo)


def test_wrong_family_config_json(repo):
    cfg = json.loads((repo / SUB / "config.json").read_text())
    cfg["hidden_size"] = 2560  # an XL config.json next to 2B-shaped expectations
    (repo / SUB / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"config.json: architecture does not match.*hidden_size: file has 2560"):
        load_from(repo)


def test_wrong_family_weights_list_mismatched_keys(tiny, repo):
    """An XL-like file (wider DiT, extra layer) without config.json: missing/unexpected/mis-shaped keys named."""
    arch = tiny.config.to_dict()
    arch.update(hidden_size=96, num_hidden_layers=3, encoder_hidden_size=64, encoder_intermediate_size=128,
                encoder_num_attention_heads=4, encoder_num_key_value_heads=2, layer_types=None)
    other = AceStepModel(AceStepConfig.from_dict(arch))
    save_acestep_model(other, repo / SUB)
    (repo / SUB / "config.json").unlink()
    with pytest.raises(CheckpointError) as e:
        load_from(repo)
    msg = str(e.value)
    assert "model.safetensors: keys do not match the model" in msg
    assert "unexpected (first: decoder.layers.2." in msg
    assert "mis-shaped (first: " in msg and "decoder.condition_embedder.weight [96, 64] (model [64, 64])" in msg


def test_pt_that_is_not_a_plain_tensor(repo):
    torch.save({"latent": torch.zeros(1, 8, 10)}, repo / SUB / "silence_latent.pt")
    with pytest.raises(CheckpointError, match=r"silence_latent.pt: expected a tensor \[1, C, T\], found a dict"):
        load_from(repo)


class _Exploit:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_pickle_code_in_pt_is_never_executed(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "silence_latent.pt"
    with open(path, "wb") as f:
        pickle.dump(_Exploit(marker), f)
    with pytest.raises(CheckpointError, match=r"silence_latent.pt: not a plain tensor file that can be loaded safely"):
        load_silence_latent(path)
    assert not marker.exists()


def test_unknown_variant():
    with pytest.raises(ValueError, match=r"unknown model variant 'turbo-xxl'; choose one of \['base'"):
        load_model("turbo-xxl")


def test_modelscope_id_that_cannot_be_fetched(tmp_path, monkeypatch):
    # Real modelscope client; its endpoint points at a closed local port so the failure is quick and offline.
    monkeypatch.setenv("MODELSCOPE_ENDPOINT", "http://127.0.0.1:9")
    with pytest.raises(CheckpointError, match=r"ACE-Step/no-such-model: could not fetch this modelscope model id"):
        load_model("tiny", source="ACE-Step/no-such-model", subfolder=SUB, cache_dir=str(tmp_path))


def test_loading_holds_one_copy_of_the_weights(tmp_path):
    """Peak RSS growth while loading a ~190 MB checkpoint stays under 1.5x its size (meta build + assign)."""
    arch = AceStepConfig(hidden_size=512, intermediate_size=1536, num_hidden_layers=12, num_attention_heads=8,
                         num_key_value_heads=4, head_dim=64, text_hidden_dim=256, num_lyric_encoder_hidden_layers=4,
                         num_timbre_encoder_hidden_layers=2, fsq_dim=512)
    save_acestep_model(AceStepModel(arch), tmp_path / "ckpt")
    size = (tmp_path / "ckpt" / "model.safetensors").stat().st_size
    assert size > 150e6
    script = textwrap.dedent(f"""
        import json, resource, threading, time, torch
        from pathlib import Path
        from acestep_train.checkpoints.loading import build_acestep_model
        from acestep_train.models import AceStepConfig
        def rss():
            return int(open('/proc/self/statm').read().split()[1]) * resource.getpagesize()
        # ru_maxrss also counts the import-time peak, so sample the resident size while loading instead.
        peak, done = [0], threading.Event()
        def watch():
            while not done.is_set():
                peak[0] = max(peak[0], rss())
                time.sleep(0.002)
        arch = AceStepConfig.from_json(Path({str(tmp_path / 'ckpt' / 'config.json')!r}))
        base = rss()
        t = threading.Thread(target=watch); t.start()
        model = build_acestep_model(arch, Path({str(tmp_path / 'ckpt')!r}))
        done.set(); t.join()
        peak = max(peak[0], rss())
        print(json.dumps({{"base": base, "peak": peak, "params": sum(p.numel() for p in model.parameters())}}))
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True,
                         cwd=tmp_path).stdout
    r = json.loads(out.strip().splitlines()[-1])
    assert r["params"] * 4 == pytest.approx(size, rel=0.01)
    growth = r["peak"] - r["base"]
    assert growth < 1.5 * size, f"loading grew RSS by {growth / 1e6:.0f} MB for a {size / 1e6:.0f} MB checkpoint"
