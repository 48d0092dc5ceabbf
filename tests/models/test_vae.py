"""AudioVAE: released key/shape layout, parity with DiffSynth's independent implementation, posterior sampling,
overlap-discard tiling, save/load, and errors."""

import json
from contextlib import contextmanager

import pytest
import torch
import torch.nn.functional as F

from acestep_train.models.vae import RELEASED_VAE_CONFIG, TINY_VAE_CONFIG, AudioVAE
from manifest_helpers import ds_hash, load_manifest
from numerics import rel_err

HOP = 1920
# DiffSynth's recorded fingerprint of the real vae/diffusion_pytorch_model.safetensors (checkpoints/README.md).
VAE_MD5 = "51420834e54474986a7f4be0e4d6f687"


@pytest.fixture(scope="module")
def tiny_vae() -> AudioVAE:
    """Tiny VAE with every parameter randomised (incl. Snake alpha/beta, which init to 0), so parity is non-trivial."""
    torch.manual_seed(0)
    vae = AudioVAE.from_config(TINY_VAE_CONFIG).eval()
    with torch.no_grad():
        for name, p in vae.model.named_parameters():
            if name.endswith(("alpha", "beta")):
                p.normal_(0.0, 0.3)
            else:
                p.add_(torch.randn_like(p) * 0.05)
    return vae


def test_manifest_md5_matches_diffsynth_record():
    assert ds_hash(load_manifest("vae.keys.json")) == VAE_MD5


def test_released_config_builds_exact_checkpoint_layout():
    manifest = load_manifest("vae.keys.json")
    with torch.device("meta"):
        vae = AudioVAE.from_config(RELEASED_VAE_CONFIG)
    ours = {k: list(v.shape) for k, v in vae.model.state_dict().items()}
    assert ours == manifest
    assert ds_hash(ours) == VAE_MD5
    assert (vae.hop_length, vae.sample_rate, vae.latent_dim) == (1920, 48000, 64)


def test_tiny_config_same_structure_and_rates():
    manifest = load_manifest("vae.keys.json")
    with torch.device("meta"):
        vae = AudioVAE.from_config(TINY_VAE_CONFIG)
    assert set(vae.model.state_dict()) == set(manifest)
    assert (vae.hop_length, vae.sample_rate, vae.latent_dim) == (1920, 48000, 64)


@pytest.fixture(scope="module")
def diffsynth_vae(tiny_vae):
    mod = pytest.importorskip("diffsynth.models.ace_step_vae")
    cfg = {k: v for k, v in TINY_VAE_CONFIG.items() if not k.startswith("_")}
    ds = mod.AceStepVAE(**cfg).eval()
    ds.load_state_dict(tiny_vae.model.state_dict(), strict=True)
    return ds


def test_decode_matches_diffsynth(tiny_vae, diffsynth_vae):
    torch.manual_seed(1)
    z = torch.randn(2, 12, 64)
    with torch.no_grad():
        ours = tiny_vae.decode(z, tile=False)
        ref = diffsynth_vae.decode(z.transpose(1, 2))
    assert ours.shape == (2, 2, 12 * HOP)
    assert rel_err(ours, ref) <= 1e-5


def test_encode_mean_and_sample_match_diffsynth(tiny_vae, diffsynth_vae):
    torch.manual_seed(2)
    x = torch.rand(1, 2, 6 * HOP + 123) * 2 - 1  # trailing 123 samples: T = N // hop
    with torch.no_grad():
        mean = tiny_vae.encode(x, sample=False)
        h = diffsynth_vae.encoder(x)
        drawn = tiny_vae.encode(x, sample=True, generator=torch.Generator().manual_seed(7))
        again = tiny_vae.encode(x, sample=True, generator=torch.Generator().manual_seed(7))
        other = tiny_vae.encode(x, sample=True, generator=torch.Generator().manual_seed(8))
    m, s = h.chunk(2, dim=1)  # DiffSynth's posterior mean is the first half of the encoder output
    assert mean.shape == (1, 6, 64)
    assert rel_err(mean, m.transpose(1, 2)) <= 1e-5
    # Posterior sample written out independently: mean + (softplus(scale) + 1e-4) * eps, eps drawn channel-first.
    eps = torch.randn(m.shape, generator=torch.Generator().manual_seed(7))
    expected = (m + (F.softplus(s) + 1e-4) * eps).transpose(1, 2)
    assert rel_err(drawn, expected) <= 1e-5
    assert torch.equal(drawn, again)
    assert not torch.allclose(drawn, other)


@contextmanager
def count_calls(module: torch.nn.Module):
    calls = []
    handle = module.register_forward_hook(lambda *_: calls.append(1))
    try:
        yield calls
    finally:
        handle.remove()  # the VAE fixture is shared across tests


def test_tiled_decode_matches_one_pass(tiny_vae):
    # With overlap beyond the decoder's receptive radius (~9 frames) the kept core never sees a window edge, so
    # tiling is exact in exact arithmetic: in fp64 it agrees to ~1e-15. In fp32 we measured ~6e-7 relative: only
    # the accumulation order differs (convolutions over inputs of different lengths). With 2 frames of overlap
    # the zero-padded edges do reach the core (~6e-2), which shows the comparison can fail.
    torch.manual_seed(3)
    vae = AudioVAE(tiny_vae.model, decode_chunk_frames=32, decode_overlap_frames=10)
    z = torch.randn(1, 50, 64)
    with torch.no_grad(), count_calls(vae.model.decoder) as calls:
        one = vae.decode(z, tile=False)
        assert len(calls) == 1
        tiled = vae.decode(z)
        assert len(calls) == 1 + 5  # ceil(50 / (32 - 2*10)) windows
        short = vae.decode(z, chunk_frames=16, overlap_frames=2)
    assert tiled.shape == one.shape == (1, 2, 50 * HOP)
    assert rel_err(tiled, one) <= 5e-6
    assert rel_err(short, one) > 1e-3

    vae64 = AudioVAE.from_config(TINY_VAE_CONFIG, dtype=torch.float64, decode_chunk_frames=32, decode_overlap_frames=10)
    vae64.model.load_state_dict(tiny_vae.model.state_dict())
    with torch.no_grad():
        assert rel_err(vae64.decode(z), vae64.decode(z, tile=False)) <= 1e-12


def test_decode_short_input_is_one_pass_with_defaults(tiny_vae):
    with torch.no_grad(), count_calls(tiny_vae.model.decoder) as calls:
        tiny_vae.decode(torch.randn(1, 20, 64))  # 20 <= 512 default chunk
    assert len(calls) == 1


NARROW_VAE_CONFIG = {**TINY_VAE_CONFIG, "encoder_hidden_size": 16, "decoder_input_channels": 8}


@pytest.fixture(scope="module")
def narrow_vae() -> AudioVAE:
    """Same class, strides and receptive field as the tiny VAE but 16 encoder channels (8-dim latents), so an
    fp64 tiled encode stays fast. Tiling logic does not depend on the widths."""
    torch.manual_seed(5)
    vae = AudioVAE.from_config(NARROW_VAE_CONFIG).eval()
    with torch.no_grad():
        for name, p in vae.model.named_parameters():
            if name.endswith(("alpha", "beta")):
                p.normal_(0.0, 0.3)
    return vae


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-12), (torch.float32, 5e-6)])
def test_tiled_encode_matches_one_pass(narrow_vae, dtype, tol):
    # With overlap beyond the encoder's receptive radius (~7 frames) a kept frame never sees a window edge, and
    # windows that reach the end also take the trailing < hop samples, so tiling is exact in exact arithmetic:
    # fp64 agrees to ~1e-15 (a real tiling error, e.g. dropping the trailing samples, gave ~1e-5 here).
    # In fp32 only the accumulation order differs: measured ~1e-6 relative (8.5e-7 on the 128-wide tiny VAE).
    torch.manual_seed(4)
    x = torch.rand(1, 2, 30 * HOP + 700, dtype=dtype) * 2 - 1  # 700 trailing samples: T = 30
    vae = AudioVAE.from_config(NARROW_VAE_CONFIG, dtype=dtype)
    vae.model.load_state_dict(narrow_vae.model.state_dict())
    with torch.no_grad(), count_calls(vae.model.encoder) as calls:
        one = vae.encode(x, sample=False)
        tiled = vae.encode(x, sample=False, chunk_samples=24 * HOP, overlap_samples=8 * HOP)
    assert len(calls) == 1 + 4  # ceil(30 / (24 - 2*8)) windows
    assert tiled.shape == one.shape == (1, 30, 8)
    assert tiled.dtype == dtype
    assert rel_err(tiled, one) <= tol


def test_bad_shapes_and_tiling_raise(tiny_vae):
    with pytest.raises(ValueError, match=r"\[B, 2, N\]"):
        tiny_vae.encode(torch.zeros(2, 4 * HOP))
    with pytest.raises(ValueError, match=r"\[B, 2, N\]"):
        tiny_vae.encode(torch.zeros(1, 1, 4 * HOP))
    with pytest.raises(ValueError, match="at least 1920"):
        tiny_vae.encode(torch.zeros(1, 2, 100))
    with pytest.raises(ValueError, match=r"\[B, T, 64\]"):
        tiny_vae.decode(torch.zeros(1, 64, 10))
    with pytest.raises(ValueError, match=r"\[B, T, 64\]"):
        tiny_vae.decode(torch.zeros(10, 64))
    with pytest.raises(ValueError, match="multiples of 1920"):
        tiny_vae.encode(torch.zeros(1, 2, 4 * HOP), chunk_samples=1000, overlap_samples=0)
    with pytest.raises(ValueError, match="greater than 2 \\* overlap"):
        tiny_vae.decode(torch.zeros(1, 10, 64), chunk_frames=8, overlap_frames=4)


def test_bad_config_raises():
    with pytest.raises(ValueError, match="missing keys \\['sampling_rate'\\]"):
        AudioVAE.from_config({k: v for k, v in TINY_VAE_CONFIG.items() if k != "sampling_rate"})
    with pytest.raises(ValueError, match="2 \\* decoder_input_channels"):
        AudioVAE.from_config({**TINY_VAE_CONFIG, "decoder_input_channels": 32})


def test_save_load_round_trip_bit_exact(tiny_vae, tmp_path):
    tiny_vae.save_pretrained(tmp_path / "vae")
    files = sorted(p.name for p in (tmp_path / "vae").iterdir())
    assert files == ["config.json", "diffusion_pytorch_model.safetensors"]
    loaded = AudioVAE.from_pretrained(tmp_path / "vae")
    a, b = tiny_vae.model.state_dict(), loaded.model.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert {k: v for k, v in loaded.model.config.items() if not k.startswith("_")} == {
        k: v for k, v in TINY_VAE_CONFIG.items() if not k.startswith("_")
    }
    half = AudioVAE.from_pretrained(tmp_path / "vae", dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in half.parameters())


def test_load_errors_name_the_path(tiny_vae, tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(FileNotFoundError, match=str(missing)):
        AudioVAE.from_pretrained(missing)

    folder = tmp_path / "vae"
    tiny_vae.save_pretrained(folder)
    weights = folder / "diffusion_pytorch_model.safetensors"
    data = weights.read_bytes()

    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(RuntimeError, match=str(weights)):
        AudioVAE.from_pretrained(folder)

    weights.unlink()
    with pytest.raises(FileNotFoundError, match=str(weights)):
        AudioVAE.from_pretrained(folder)
