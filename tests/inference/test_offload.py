"""Low-VRAM mode (acestep_train/offload.py) on the CPU: the accounting of what is "on the compute device" never
exceeds the limit, outputs are bit-identical to running without the manager, phases take the text encoder and the
VAE off the device, and with ``force_copy`` the moves are real copies (the mechanism a GPU run uses)."""

import warnings

import pytest
import torch

from acestep_train import load_model
from acestep_train.lora import load_adapters, save_lora_weights
from acestep_train.lora import LoraDelta
from acestep_train.inference.offload import COMPONENTS, OffloadError, OffloadManager, iter_blocks
from acestep_train.inference import GenerationRequest, Sampler


@pytest.fixture(scope="module")
def bundle():
    b = load_model("tiny")
    # Small decode tiles so that a few seconds of audio are decoded in several tiles.
    b.vae.decode_chunk_frames, b.vae.decode_overlap_frames = 32, 4
    return b


def t2m_requests():
    # DiffSynth semantics: no 5.12 s minimum length, so short (cheap) tracks.
    return [GenerationRequest("lo-fi piano", lyrics="[verse]\nla la", duration=2.5, seed=1, semantics="diffsynth"),
            GenerationRequest("techno", duration=2, seed=2, semantics="diffsynth")]


def all_task_requests():
    """text2music of two lengths, CFG (another denoising group), and a cover (VAE encode, tokenizer, detokenizer)."""
    src = torch.sin(torch.linspace(0, 2000, 48000 * 2))[None].repeat(2, 1) * 0.5
    return t2m_requests() + [
        GenerationRequest("jazz", duration=2, seed=3, guidance="cfg", cfg_scale=2.0, semantics="diffsynth"),
        GenerationRequest("cover it", task_type="cover", src_audio=src, seed=4, audio_cover_strength=0.5),
    ]


def min_limit(bundle) -> int:
    with OffloadManager(bundle, "cpu") as mgr:
        return mgr.min_limit_bytes


def storage_ptrs(bundle) -> dict[str, int]:
    mods = {"m": bundle.model, "v": bundle.vae, "t": bundle.text_encoder}
    return {f"{k}.{n}": p.data_ptr() for k, m in mods.items() for n, p in m.named_parameters()}


_REFERENCE = {}


@pytest.fixture
def reference(bundle):
    """Without the manager; per thread count (CPU matmuls round differently with another number of threads, and the
    function-scoped thread setting of conftest.py applies only inside tests)."""
    key = torch.get_num_threads()
    if key not in _REFERENCE:
        _REFERENCE[key] = Sampler(bundle, tiled_decode=True)(all_task_requests(), progress=False)
    return _REFERENCE[key]


@pytest.mark.parametrize("extra", [0, None], ids=["smallest", "unlimited"])
def test_resident_bytes_within_limit_and_output_bit_identical(bundle, reference, extra):
    before = storage_ptrs(bundle)
    limit = None if extra is None else min_limit(bundle) + extra
    mgr = OffloadManager(bundle, "cpu", limit_bytes=limit, force_copy=True)
    seen = []
    mgr.listeners.append(lambda event, name, resident: seen.append(resident))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an over-limit warning would fail the test
        with mgr:
            out = Sampler(bundle, tiled_decode=True)(all_task_requests(), progress=False)
            rep = mgr.report()
    assert torch.equal(out.audio, reference.audio)
    assert torch.equal(out.latents, reference.latents)
    assert seen and rep["peak_resident_bytes"] == max(seen)
    if limit is not None:
        assert max(seen) <= limit and rep["overflows"] == 0
    assert rep["moved_bytes"] > 0 and rep["blocks_used"] > 0
    if extra == 0:
        # The smallest budget keeps almost nothing: layers are streamed in again on every use.
        assert rep["blocks_streamed"] > 10
    if extra is None:
        assert rep["blocks_streamed"] < rep["blocks_used"]  # kept after first use, until the phase ends
    # Detached: every parameter is its storage tensor again.
    assert storage_ptrs(bundle) == before


def test_partial_budget_keeps_early_layers_and_streams_late_ones(bundle):
    """DiffSynth's "preparing" state: in execution order, blocks stay while the budget allows."""
    limit = min_limit(bundle) + 150_000
    mgr = OffloadManager(bundle, "cpu", limit_bytes=limit, force_copy=True)
    dit_layers = [m for n, m in bundle.model.decoder.layers.named_children()]
    state = {}

    def probe(i):
        def hook(mod, args):  # runs after the manager's pre-hook (registered with prepend)
            p = next(mod.parameters())
            state.setdefault(i, []).append(p.data_ptr() != storage[id(p)])
        return hook

    storage = {id(p): p.data_ptr() for p in bundle.model.parameters()}
    handles = [m.register_forward_pre_hook(probe(i)) for i, m in enumerate(dit_layers)]
    try:
        with mgr:
            Sampler(bundle)(t2m_requests()[:1], progress=False)
            kept_after = [mgr.is_on_compute(next(m.parameters())) for m in dit_layers]
            rep = mgr.report()
    finally:
        for h in handles:
            h.remove()
    # During its forward every layer is on the compute device (a copy, not the storage tensor) ...
    assert all(all(v) for v in state.values()) and len(state) == len(dit_layers)
    # ... the budget kept some blocks and streamed others; the peak stayed within the limit.
    assert 0 < rep["blocks_streamed"] < rep["blocks_used"]
    assert rep["peak_resident_bytes"] <= limit
    assert kept_after == [False] * len(dit_layers)  # the VAE phase evicted the DiT


def test_phases_move_text_encoder_and_vae_off_the_device(bundle):
    mgr = OffloadManager(bundle, "cpu", force_copy=True)  # no limit: whole components stay during their phase
    during_dit = []
    te_params = list(bundle.text_encoder.parameters())
    vae_params = [p for p in bundle.vae.parameters() if not mgr_anchor(bundle, p)]
    te_storage = {id(p): p.data_ptr() for p in te_params}

    def listener(event, name, resident):
        if event == "acquire" and name.startswith("AceStepDiT"):
            during_dit.append((mgr.component_bytes("text_encoder"), mgr.component_bytes("vae"),
                               mgr.component_bytes("condition_encoder"),
                               all(p.data_ptr() == te_storage[id(p)] for p in te_params)))

    mgr.listeners.append(listener)
    with mgr:
        Sampler(bundle)(t2m_requests()[:1], progress=False)
        assert mgr.history == ["text_encoder", "condition_encoder", "dit", "vae"]
        assert mgr.component_bytes("vae") > 0 and mgr.component_bytes("dit") == 0  # ended in the VAE phase
        mgr.offload_all()
        assert all(mgr.component_bytes(c) == 0 for c in COMPONENTS)
        assert not any(mgr.is_on_compute(p) for p in vae_params)
        # Explicit phase API.
        with mgr.phase("text_encoder"):
            bundle.text_encoder.encode_captions(["a caption"])
            assert mgr.component_bytes("text_encoder") == mgr.component_sizes()["text_encoder"]
        assert mgr.component_bytes("text_encoder") == 0
        assert mgr.resident_bytes == mgr.anchor_bytes
    assert during_dit and all(te == 0 and vae == 0 and cond == 0 and te_on_storage
                              for te, vae, cond, te_on_storage in during_dit)


def mgr_anchor(bundle, p) -> bool:
    return p is next(bundle.vae.parameters())


def test_weight_norm_temporaries_do_not_stay_on_the_device(bundle):
    conv = bundle.vae.model.decoder.conv1
    before = conv.weight.clone()
    with OffloadManager(bundle, "cpu", force_copy=True):
        bundle.vae.decode(torch.randn(1, 10, bundle.vae.latent_dim), tile=False)
        assert conv.weight.device.type == "meta"  # the computed weight was dropped after the forward
    assert conv.weight.device.type == "cpu" and torch.equal(conv.weight, before)  # recomputed on detach


def test_unfused_lora_adapters_stream_with_their_layers(bundle, tmp_path):
    """Unfused adapters are PEFT parameters of the DiT layers: the manager streams them with their layer's block
    (none is an anchor), the limit holds, and the audio is bit-identical to running without the manager."""
    g = torch.Generator().manual_seed(0)
    weights = {f"layers.{i}.self_attn.{p}": LoraDelta(torch.randn(2, 64, generator=g) * 0.3,
                                                       torch.randn(64, 2, generator=g) * 0.3, 2.0)
               for i in range(2) for p in ("q_proj", "o_proj")}
    path = save_lora_weights(weights, tmp_path / "lora.safetensors", "acestep")
    reqs = t2m_requests()[:1]
    with OffloadManager(bundle, "cpu") as mgr:
        dit_bytes = mgr.component_sizes()["dit"]
    with load_adapters(bundle.model, [(path, 0.7)], fuse=False):
        adapter = [p for n, p in bundle.model.decoder.named_parameters() if ".lora_" in n]
        assert len(adapter) == 8  # 4 modules x (A, B)
        ref = Sampler(bundle)(reqs, progress=False)
        limit = min_limit(bundle) + 100_000
        mgr = OffloadManager(bundle, "cpu", limit_bytes=limit, force_copy=True)
        with mgr:
            assert mgr.component_sizes()["dit"] - dit_bytes == 4 * (2 * 64 + 64 * 2) * 4  # float32 A + B
            assert not any(mgr.is_on_compute(p) for p in adapter)  # managed, not anchors
            layer0 = bundle.model.decoder.layers[0].self_attn.q_proj
            seen = []
            mgr.listeners.append(lambda event, name, _: seen.append(mgr.is_on_compute(layer0.lora_A["loaded_0"].weight))
                                 if event == "acquire" and name == "AceStepDiT.layers.0" else None)
            out = Sampler(bundle)(reqs, progress=False)
            assert seen and all(seen)  # brought in with the block of layers.0
            assert mgr.report()["peak_resident_bytes"] <= limit
    assert torch.equal(out.audio, ref.audio)
    assert not any(".lora_" in n for n, _ in bundle.model.named_parameters())  # removed: the bundle is plain again


def test_limits_and_devices_are_checked(bundle):
    smallest = min_limit(bundle)
    with pytest.raises(OffloadError, match="below the smallest working set"):
        OffloadManager(bundle, "cpu", limit_bytes=smallest - 1).attach()
    with pytest.raises(OffloadError, match="> 0"):
        OffloadManager(bundle, "cpu", vram_limit_gb=0)
    with pytest.raises(OffloadError, match="not both"):
        OffloadManager(bundle, "cpu", vram_limit_gb=1, limit_bytes=1)
    if not torch.cuda.is_available():
        with pytest.raises(OffloadError, match="CUDA is not available"):
            OffloadManager(bundle, "cuda")
    mgr = OffloadManager(bundle, "cpu", limit_bytes=smallest).attach()
    try:
        with pytest.raises(OffloadError, match="unknown component"):
            mgr.activate("lm")
        with pytest.raises(OffloadError, match="already attached"):
            mgr.attach()
    finally:
        mgr.detach()
    assert "encode_captions" not in vars(bundle.text_encoder)  # entry wrappers removed


def test_blocks_cover_every_parameter(bundle):
    """Layers of every ModuleList are streaming units; every parameter is in a block or an anchor."""
    with OffloadManager(bundle, "cpu") as mgr:
        blocks = list(iter_blocks(mgr))
        units = [name for name, _, _, unit in blocks if unit]
        n_layers = bundle.config.num_hidden_layers
        assert sum(name.startswith("AceStepDiT.layers.") for name in units) == n_layers
        assert any(name.startswith("TextEncoder.model.layers.") for name in units)
        assert any(name.startswith("AudioVAE.model.decoder.block.") for name in units)
        assert any("lyric_encoder.layers." in name for name in units)
        total = sum(p.numel() * p.element_size() for m in (bundle.model, bundle.vae, bundle.text_encoder)
                    for p in m.parameters())
        total += sum(b.numel() * b.element_size() for m in (bundle.model, bundle.vae, bundle.text_encoder)
                     for b in m.buffers())
        assert sum(mgr.component_sizes().values()) + mgr.anchor_bytes == total
