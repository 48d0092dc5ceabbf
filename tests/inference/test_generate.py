"""``python -m acestep_train.inference.generate`` on the tiny model: files written (and nothing else), sidecar contents, flac,
``@file`` values, several seeds, adapters exactly as in Python, low-VRAM mode, and bad inputs failing early with
exit status 2 and one message."""

import json
import os
import subprocess
import sys
from dataclasses import dataclass, fields
from unittest import mock
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from acestep_train.inference import generate as gen
from acestep_train import load_model
from acestep_train.lora import load_adapters, save_lora_weights
from acestep_train.lora import LoraDelta
from acestep_train.inference import GenerationRequest, Sampler
from acestep_train.checkpoints.variants import CONF_DIR

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONWARNINGS": "ignore"}


def cli(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "acestep_train.inference.generate", "model=tiny", "progress=false", *args],
                          cwd=cwd, env=ENV, capture_output=True, text=True, timeout=300)


def compose_generate(overrides: list[str]):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="generate", overrides=["model=tiny", "progress=false", *overrides])


def lora_file(path: Path, module_prefix: str = "layers") -> Path:
    g = torch.Generator().manual_seed(7)
    weights = {f"{module_prefix}.{i}.{attn}.{p}": LoraDelta(torch.randn(2, 64, generator=g) * 0.4,
                                                             torch.randn(64, 2, generator=g) * 0.4, 2.0)
               for i in range(2) for attn in ("self_attn", "cross_attn") for p in ("q_proj", "o_proj")}
    return save_lora_weights(weights, path, "comfyui")


def python_audio(requests, adapters=(), fuse=False) -> torch.Tensor:
    bundle = load_model("tiny")
    if adapters:
        load_adapters(bundle.model, list(adapters), fuse=fuse)
    return Sampler(bundle)(requests, progress=False).audio


def test_schema_follows_generation_request():
    """The generate config's keys are GenerationRequest's fields (each null: the request's default) plus generate's own
    options, exactly those with these defaults: no copied list to keep in sync."""
    cfg = compose_generate(["out=x.wav"])
    request = [f.name for f in fields(GenerationRequest)]
    own = {"prompts": None, "out": "x.wav", "spectrogram": True, "sidecar": True, "adapters": [],
           "fuse_adapters": False, "device": "auto", "vram_limit": None, "pin_memory": None, "tiled_decode": None,
           "vae_decode_chunk_frames": None, "vae_decode_overlap_frames": None, "progress": False,
           "log_level": "WARNING"}  # progress=false: compose_generate's override
    values = OmegaConf.to_container(cfg, resolve=False)
    assert list(values)[: len(request)] == request and all(values[k] is None for k in request)
    assert {k: v for k, v in values.items() if k not in request and k not in ("model", "paths")} == own
    assert values["model"]["name"] == "tiny" and set(values["paths"]) >= {"model_cache"}

    # A field added to GenerationRequest becomes a key with no edit anywhere (negative control: absent before).
    @dataclass
    class Extended(GenerationRequest):
        brand_new_knob: int = 3

    assert "brand_new_knob" not in cfg
    with mock.patch("acestep_train.inference.GenerationRequest", Extended):
        gen.register_schema()
    try:
        assert compose_generate(["out=x.wav", "brand_new_knob=5"]).brand_new_knob == 5
    finally:
        gen.register_schema()  # back to the real request class
    with pytest.raises(Exception, match="brand_new_knob"):
        compose_generate(["out=x.wav", "brand_new_knob=5"])


def test_unknown_key_is_refused():
    with pytest.raises(Exception, match="promt"):
        compose_generate(["out=x.wav", "promt=typo"])


def test_cli_writes_flac_png_and_sidecar_for_several_seeds(tmp_path):
    torch.set_num_threads(1)  # as the subprocess (OMP_NUM_THREADS=1): the same CPU rounding
    (tmp_path / "lyrics.txt").write_text("[verse]\nneon lights and rain\n", encoding="utf-8")
    proc = cli(['prompt="lo-fi piano, rain"', "lyrics=@lyrics.txt", "duration=5.5", "seed=[11,12]", "bpm=90",
                "out=out/song.flac"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    # Nothing but the requested outputs (and the input) in the working directory: no Hydra run folder or log.
    assert sorted(os.listdir(tmp_path)) == ["lyrics.txt", "out"]
    assert sorted(os.listdir(tmp_path / "out")) == [f"song_{i}.{x}" for i in range(2) for x in ("flac", "json", "png")]

    sidecars = [json.loads((tmp_path / "out" / f"song_{i}.json").read_text()) for i in range(2)]
    for i, sc in enumerate(sidecars):
        assert sc["seed"] == sc["params"]["seed"] == sc["request"]["seed"] == 11 + i
        assert sc["request"]["prompt"] == "lo-fi piano, rain"
        assert sc["request"]["lyrics"] == "[verse]\nneon lights and rain"
        assert sc["text_files"] == {"lyrics": str((tmp_path / "lyrics.txt").resolve())}
        assert sc["request"]["bpm"] == 90 and sc["request"]["duration"] == 5.5
        assert sc["params"]["num_inference_steps"] == 8 and sc["params"]["timesteps"]
        assert sc["model"]["variant"] == "tiny" and sc["model"]["source"] is None and sc["model"]["seed"] == 0
        assert sc["adapters"] == [] and sc["offload"] is None
        assert sc["format"] == "FLAC" and sc["spectrogram"] == f"song_{i}.png"
        assert sc["batch"] == {"index": i, "size": 2, "files": ["song_0.flac", "song_1.flac"]}
        assert "seed=[11,12]" in sc["overrides"]
        data, rate = sf.read(tmp_path / "out" / f"song_{i}.flac", dtype="float32", always_2d=True)
        assert rate == 48000 and data.shape == (sc["samples"], 2)
        # -1 dBFS once (the sampler normalises; generate must not do it again), up to 24-bit rounding.
        assert abs(20 * np.log10(np.abs(data).max()) + 1.0) < 1e-3
    assert (tmp_path / "out" / "song_0.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # The sidecar's request reproduces the track in Python (alone rather than in a batch of two, so CPU matmuls
    # round a little differently: equal to ~1e-6, not bit for bit).
    again = python_audio([GenerationRequest(**sidecars[0]["request"])])[0]
    data, _ = sf.read(tmp_path / "out" / "song_0.flac", dtype="float32", always_2d=True)
    np.testing.assert_allclose(data.T, again[:, : data.shape[0]].numpy(), rtol=0, atol=2e-6)


def test_cli_adapter_changes_output_exactly_like_python(tmp_path):
    torch.set_num_threads(1)  # as the subprocess (OMP_NUM_THREADS=1): bit-identical CPU arithmetic
    lora = lora_file(tmp_path / "style.safetensors")
    proc = cli(["prompt=synthwave", "duration=2", "semantics=diffsynth", "seed=3",
                "adapters=[{path:style.safetensors,strength:0.8}]", "out=song.wav"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    sc = json.loads((tmp_path / "song.json").read_text())
    (rec,) = sc["adapters"]
    assert {k: rec[k] for k in ("path", "strength", "format", "fused", "modules", "rank", "alpha")} == {
        "path": str(lora.resolve()), "strength": 0.8, "format": "comfyui", "fused": False, "modules": 8, "rank": 2,
        "alpha": 4.0}
    assert len(rec["sha256"]) == 64 and sc["fuse_adapters"] is False
    data, _ = sf.read(tmp_path / "song.wav", dtype="float32", always_2d=True)
    written = torch.from_numpy(data.T.copy())
    req = [GenerationRequest("synthwave", duration=2, seed=3, semantics="diffsynth")]
    with_adapter = python_audio(req, [(lora, 0.8)])[0]
    without = python_audio(req)[0]
    assert torch.equal(written, with_adapter[:, : written.shape[1]])  # float32 wav: exact
    assert (written - without[:, : written.shape[1]]).abs().max() > 1e-2  # and the adapter did change it


def test_fused_adapter_and_low_vram_mode_in_process(tmp_path):
    """run(cfg) in this process: fused adapters match Python's fused load; low-VRAM mode (CPU: accounting only)
    gives the same audio and keeps the weights on the 'device' within the limit."""
    lora = lora_file(tmp_path / "style.safetensors")
    base = ["prompt=synthwave", "duration=2", "semantics=diffsynth", "seed=4",
            f"adapters=[{{path:'{lora}',strength:0.5}}]", "fuse_adapters=true"]
    sc = gen.run(compose_generate(base + [f"out={tmp_path / 'fused.wav'}"]))[0]
    assert sc["adapters"][0]["fused"] is True and sc["adapters"][0]["strength"] == 0.5
    fused = torch.from_numpy(sf.read(tmp_path / "fused.wav", dtype="float32", always_2d=True)[0].T.copy())
    req = [GenerationRequest("synthwave", duration=2, seed=4, semantics="diffsynth")]
    expected = python_audio(req, [(lora, 0.5)], fuse=True)[0]
    assert torch.equal(fused, expected[:, : fused.shape[1]])

    limit_gb = 0.0022  # tiny model: anchors ~1.5 MB + the largest layers in flight
    sc = gen.run(compose_generate(base + [f"out={tmp_path / 'low.wav'}", f"vram_limit={limit_gb}", "device=cpu",
                                          "fuse_adapters=false", "vae_decode_chunk_frames=32",
                                          "vae_decode_overlap_frames=4"]))[0]
    rep = sc["offload"]
    assert sc["vram_limit_gb"] == limit_gb and sc["tiled_decode"] is True
    assert 0 < rep["peak_resident_bytes"] <= rep["limit_bytes"] == int(limit_gb * 1024**3)
    assert rep["phases"] == ["text_encoder", "condition_encoder", "dit", "vae"] and rep["overflows"] == 0
    low = torch.from_numpy(sf.read(tmp_path / "low.wav", dtype="float32", always_2d=True)[0].T.copy())
    bundle = load_model("tiny")
    bundle.vae.decode_chunk_frames, bundle.vae.decode_overlap_frames = 32, 4
    load_adapters(bundle.model, [(lora, 0.5)], fuse=False)
    plain = Sampler(bundle, tiled_decode=True)(req, progress=False).audio[0]
    assert torch.equal(low, plain[:, : low.shape[1]])


def test_bad_input_exits_2_with_one_message(tmp_path):
    proc = cli(["task_type=remix", "out=x.wav"], tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.strip() == ("error: request 0: unknown task_type 'remix'; choose one of text2music, cover, "
                                   "repaint")
    assert "Traceback" not in proc.stderr and os.listdir(tmp_path) == []


NO_OUT = "<no out>"


@pytest.mark.parametrize("overrides, message", [
    (["duration=0"], "duration must be > 0"),
    (["duration=-3"], "duration must be > 0"),
    (["task_type=cover", "src_audio=@BAD"], "src_audio: cannot use this audio file"),
    (["lyrics=@MISSING_TXT"], "no such file"),
    (["adapters=[@UNMATCHED]"], "0 of 8 LoRA modules match the model"),
    (["adapters=[@MISSING_LORA]"], "no such adapter file"),
    (["out=song.mp3"], "must end in .wav or .flac"),
    (["prompt=a", "prompts=[b,c]"], "not both"),
    (["prompts=[a,b,c]", "seed=[1,2]"], "differ in length"),
    (["vram_limit=0.00001"], "below the smallest working set"),
    (["vram_limit=-1"], "vram_limit must be a number of GB > 0"),
    (["device=cuda:0"] if not torch.cuda.is_available() else ["device=nonsense"], "device="),
    ([NO_OUT], "out= is required"),
])
def test_bad_inputs_fail_before_loading_the_model(tmp_path, monkeypatch, capsys, overrides, message):
    (tmp_path / "bad.wav").write_bytes(b"RIFF not really a wav file")
    lora_file(tmp_path / "unmatched.safetensors", module_prefix="blocks")
    subst = {"@BAD": str(tmp_path / "bad.wav"), "@MISSING_TXT": "@" + str(tmp_path / "nope.txt"),
             "@UNMATCHED": str(tmp_path / "unmatched.safetensors"),
             "@MISSING_LORA": str(tmp_path / "nope.safetensors")}
    ovr = []
    for o in overrides:
        for k, v in subst.items():
            o = o.replace(k, v)
        ovr.append(o)
    if NO_OUT in ovr:
        ovr.remove(NO_OUT)
    elif not any(o.startswith("out=") for o in ovr):
        ovr.append(f"out={tmp_path / 'x.wav'}")
    cfg = compose_generate(ovr)
    if not any(o.startswith("vram_limit=0.0") for o in ovr):  # only the limit is checked against loaded modules
        import acestep_train.checkpoints.loading as loading
        monkeypatch.setattr(loading, "load_bundle", lambda *a, **k: pytest.fail("loaded the model before failing"))
    with pytest.raises(SystemExit) as exc:
        gen.run_cli(cfg)
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and "\n" not in err, err
    assert not (tmp_path / "x.wav").exists()


def test_build_job_batches_prompts_and_seeds(tmp_path):
    (tmp_path / "p.txt").write_text("from a file\n")
    job = gen.build_job({"prompts": [f"@{tmp_path / 'p.txt'}", "@@literal", "plain"], "seed": 5,
                         "out": str(tmp_path / "a.wav"), "guidance_interval": [0.2, 0.8],
                         "repainting_ranges": None, "adapters": ["x.safetensors", {"path": "y", "strength": 2}]})
    assert [r.prompt for r in job.requests] == ["from a file", "@literal", "plain"]
    assert [r.seed for r in job.requests] == [5, 5, 5]
    assert job.requests[0].guidance_interval == (0.2, 0.8)
    assert [p.name for p in job.outputs] == ["a_0.wav", "a_1.wav", "a_2.wav"]
    assert job.text_files[0] == {"prompt": str((tmp_path / "p.txt").resolve())} and job.text_files[1] == {}
    assert [(a.path, a.strength) for a in job.adapters] == [("x.safetensors", 1.0), ("y", 2.0)]
    job = gen.build_job({"prompt": "x", "seed": [1, 2], "out": "b.flac"})
    assert [r.seed for r in job.requests] == [1, 2] and [p.name for p in job.outputs] == ["b_0.flac", "b_1.flac"]
