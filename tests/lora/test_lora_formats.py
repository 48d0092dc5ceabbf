"""LoRA files in the four layouts (ours, PEFT folder, DiffSynth, ComfyUI): each changes the DiT exactly as the
equivalent merged weights ``W' = W + strength · scale · B @ A`` computed here independently (fp32, rel ≤ 1e-5),
fused and as live PEFT adapters, alone and two at once; exports round-trip; the PEFT folder loads with
``PeftModel``; the DiffSynth file loads with DiffSynth's own ``GeneralLoRALoader`` on DiffSynth's DiT; ComfyUI's
alpha rule is emulated."""

from __future__ import annotations

import contextlib
import io
import json
import warnings

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from acestep_train.lora import (LoraDelta, LoraError, LoraMatchError, apply_lora, convert_lora, detect_format,
                                export_lora, load_adapters, read_lora)
from acestep_train.models import AceStepConfig, AceStepModel
from acestep_train.models.dit import AceStepDiT
from numerics import rel_err

TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            head_dim=16, sliding_window=4, text_hidden_dim=32, num_lyric_encoder_hidden_layers=1,
            num_timbre_encoder_hidden_layers=1, num_attention_pooler_hidden_layers=1, fsq_dim=64)
CFG = AceStepConfig(**TINY)
ATTN = r"layers\.\d+\.(self_attn|cross_attn)\.(q_proj|k_proj|v_proj|o_proj)"
MODULES = [f"layers.{i}.{a}.{p}" for i in range(CFG.num_hidden_layers) for a in ("self_attn", "cross_attn")
           for p in ("q_proj", "k_proj", "v_proj", "o_proj")]
RANK, ALPHA = 8, 16.0  # scale alpha / r = 2
TOL = 1e-5

pytestmark = pytest.mark.filterwarnings("ignore:Alpha detected in the LoRA file")


# ---- independent reference --------------------------------------------------------------------------------------

def base_model() -> AceStepModel:
    torch.manual_seed(0)
    return AceStepModel(CFG).eval()


def fresh_decoder() -> AceStepDiT:
    return base_model().decoder


def inputs(seed: int = 3):
    g = torch.Generator().manual_seed(seed)
    t = torch.rand(2, generator=g)
    return (torch.randn(2, 12, 64, generator=g), t, t, torch.randn(2, 7, CFG.encoder_width, generator=g),
            torch.randn(2, 12, 128, generator=g))


X = inputs()


def run(decoder) -> torch.Tensor:
    with torch.no_grad():
        return decoder(*X)


def random_lora(seed: int, rank: int = RANK, modules=MODULES) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Non-zero A [r, in] and B [out, r] for every attention projection of the tiny DiT."""
    g = torch.Generator().manual_seed(seed)
    dec = fresh_decoder()
    out = {}
    for p in modules:
        lin = dec.get_submodule(p)
        out[p] = (0.3 * torch.randn(rank, lin.in_features, generator=g),
                  0.3 * torch.randn(lin.out_features, rank, generator=g))
    return out


def merged_reference(adapters) -> AceStepDiT:
    """A decoder whose weights are ``W + strength · scale · B @ A`` (float64 product), built without our code."""
    dec = fresh_decoder()
    sd = dec.state_dict()
    for pairs, scale, strength in adapters:
        for p, (A, B) in pairs.items():
            sd[f"{p}.weight"] = (sd[f"{p}.weight"].double() + strength * scale * (B.double() @ A.double())).float()
    dec.load_state_dict(sd)
    return dec


# ---- files written by the test in each layout (not by our exporters) -------------------------------------------

def write_acestep(pairs, path):
    """Our layout: canonical PEFT keys + ``acestep_lora`` JSON header (rank, alpha)."""
    t = {}
    for p, (A, B) in pairs.items():
        t[f"{p}.lora_A.weight"], t[f"{p}.lora_B.weight"] = A, B
    meta = {"format": "acestep", "kind": "lora", "rank": RANK, "alpha": ALPHA, "targets": ATTN}
    save_file(t, str(path), metadata={"format": "pt", "acestep_lora": json.dumps(meta)})
    return path, ALPHA / RANK


def write_peft(pairs, path, rank=RANK, targets=("q_proj", "k_proj", "v_proj", "o_proj")):
    """What the official trainer writes: ``get_peft_model(decoder, LoraConfig(task_type=FEATURE_EXTRACTION,
    target_modules=[q,k,v,o]_proj))`` then ``save_pretrained`` (docs/training.md §6, §8.1)."""
    import peft

    pm = peft.get_peft_model(fresh_decoder(), peft.LoraConfig(
        r=rank, lora_alpha=int(ALPHA), lora_dropout=0.1, bias="none", target_modules=list(targets),
        task_type=peft.TaskType.FEATURE_EXTRACTION))
    with torch.no_grad():
        for p, (A, B) in pairs.items():
            layer = pm.base_model.model.get_submodule(p)
            layer.lora_A["default"].weight.copy_(A)
            layer.lora_B["default"].weight.copy_(B)
    pm.save_pretrained(str(path))
    return path, ALPHA / rank


def write_diffsynth(pairs, path):
    """DiffSynth's training output: ``layers.*.lora_{A,B}.default.weight``, no alpha (it trains at alpha = r)."""
    t = {}
    for p, (A, B) in pairs.items():
        t[f"{p}.lora_A.default.weight"], t[f"{p}.lora_B.default.weight"] = A, B
    save_file(t, str(path))
    return path, 1.0


def write_comfyui(pairs, path):
    """ComfyUI "official base model" keys ``base_model.model.{path}.lora_{A,B}.weight`` + ``{path}.alpha``."""
    t = {}
    for p, (A, B) in pairs.items():
        stem = f"base_model.model.{p}"
        t[f"{stem}.lora_A.weight"], t[f"{stem}.lora_B.weight"] = A, B
        t[f"{stem}.alpha"] = torch.tensor(ALPHA)
    save_file(t, str(path))
    return path, ALPHA / RANK


def write_comfyui_kohya(pairs, path):
    """The other ComfyUI form (musubi-tuner): ``lora_unet_decoder_{path with _}.lora_down/up.weight`` + ``.alpha``."""
    t = {}
    for p, (A, B) in pairs.items():
        stem = "lora_unet_decoder_" + p.replace(".", "_")
        t[f"{stem}.lora_down.weight"], t[f"{stem}.lora_up.weight"] = A, B
        t[f"{stem}.alpha"] = torch.tensor(4.0)
    save_file(t, str(path))
    return path, 4.0 / RANK


WRITERS = {"acestep": (write_acestep, "a.safetensors"), "peft": (write_peft, "peft_adapter"),
           "diffsynth": (write_diffsynth, "ds.safetensors"), "comfyui": (write_comfyui, "comfy.safetensors"),
           "comfyui-kohya": (write_comfyui_kohya, "kohya.safetensors")}


@pytest.fixture(scope="module")
def base_out() -> torch.Tensor:
    return run(fresh_decoder())


# ---- loading each layout ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("fuse", [True, False], ids=["fused", "live"])
@pytest.mark.parametrize("fmt", list(WRITERS))
def test_each_format_matches_merged_weights(fmt, fuse, tmp_path, base_out):
    pairs = random_lora(seed=11)
    writer, name = WRITERS[fmt]
    path, scale = writer(pairs, tmp_path / name)
    assert detect_format(path) == fmt.split("-")[0]
    weights = read_lora(path).weights
    assert set(weights) == set(MODULES)
    assert all(abs(w.scale - scale) < 1e-12 and torch.equal(w.A, pairs[p][0]) and torch.equal(w.B, pairs[p][1])
               for p, w in weights.items())
    ref = run(merged_reference([(pairs, scale, 1.0)]))
    dec = fresh_decoder()
    handle = load_adapters(dec, [(path, 1.0)], fuse=fuse)
    out = run(dec)
    assert rel_err(out, ref) <= TOL
    assert rel_err(out, base_out) > 1e-2  # the adapter matters
    handle.remove()
    assert rel_err(run(dec), base_out) <= (0 if not fuse else 1e-6)


@pytest.mark.parametrize("fuse", [True, False], ids=["fused", "live"])
def test_two_adapters_with_strengths(fuse, tmp_path, base_out):
    p1, p2 = random_lora(seed=1), random_lora(seed=2, rank=4, modules=MODULES[::2])
    f1, s1 = write_comfyui(p1, tmp_path / "one.safetensors")
    f2, s2 = write_peft(p2, tmp_path / "two", rank=4, targets=list(p2))  # rank 4, alpha 16: scale 4
    assert s2 == 4.0
    ref = run(merged_reference([(p1, s1, 0.7), (p2, s2, -0.5)]))
    dec = fresh_decoder()
    handle = load_adapters(dec, [(f1, 0.7), (f2, -0.5)], fuse=fuse)
    assert len(handle) == 2
    assert rel_err(run(dec), ref) <= TOL
    handle.set_strength(1, 0.25)
    assert rel_err(run(dec), run(merged_reference([(p1, s1, 0.7), (p2, s2, 0.25)]))) <= TOL
    handle.remove(0)
    assert rel_err(run(dec), run(merged_reference([(p2, s2, 0.25)]))) <= TOL
    handle.remove()
    assert rel_err(run(dec), base_out) <= (0 if not fuse else 1e-6)


def test_live_adapters_as_context_manager_beside_a_training_adapter(tmp_path, base_out):
    """Unfused adapters stack on a decoder that already carries a (zero-initialised) training adapter."""
    pairs = random_lora(seed=4)
    path, scale = write_diffsynth(pairs, tmp_path / "ds.safetensors")
    model = base_model()
    apply_lora(model.decoder, rank=2, alpha=2, target_modules=ATTN)
    with load_adapters(model, [path]):
        assert rel_err(run(model.decoder), run(merged_reference([(pairs, scale, 1.0)]))) <= TOL
    assert rel_err(run(model.decoder), base_out) <= 1e-6
    load_adapters(model, [path], fuse=True)  # fuses into q_proj.base_layer
    assert rel_err(run(model.decoder), run(merged_reference([(pairs, scale, 1.0)]))) <= TOL


# ---- our exporters -------------------------------------------------------------------------------------------------

@pytest.fixture()
def trained():
    """A decoder with a live rank-8 alpha-16 PEFT adapter whose A and B are random (as after training)."""
    dec = fresh_decoder()
    apply_lora(dec, rank=RANK, alpha=ALPHA, target_modules=ATTN)
    pairs = random_lora(seed=7)
    with torch.no_grad():
        for p, (A, B) in pairs.items():
            layer = dec.get_submodule(p)
            layer.lora_A["default"].weight.copy_(A)
            layer.lora_B["default"].weight.copy_(B)
    return dec, pairs, run(dec)


EXPORTS = {"acestep": "a.safetensors", "peft": "adapter", "diffsynth": "ds.safetensors",
           "comfyui": "comfy.safetensors"}


@pytest.mark.parametrize("fmt", list(EXPORTS))
def test_export_round_trip_is_exact(fmt, trained, tmp_path):
    dec, pairs, live = trained
    path = export_lora(dec, tmp_path / EXPORTS[fmt], fmt, variant="turbo", provenance={"shift": 3.0, "trigger": "x"})
    assert detect_format(path) == fmt
    f = read_lora(path)
    assert f.format == fmt and set(f.weights) == set(MODULES)
    for p, w in f.weights.items():
        A, B = pairs[p]
        assert torch.equal(w.B, B)
        if fmt == "diffsynth":  # scale baked into lora_A (×2: exact in binary floating point)
            assert w.scale == 1.0 and torch.equal(w.A, 2.0 * A)
        else:
            assert w.scale == 2.0 and torch.equal(w.A, A)
    # the live PEFT adapter and the re-loaded file agree, fused and as a loaded PEFT adapter
    for fuse in (True, False):
        other = fresh_decoder()
        load_adapters(other, [path], fuse=fuse)
        assert rel_err(run(other), live) <= TOL
    # metadata header in every layout
    weights_file = path / "adapter_model.safetensors" if fmt == "peft" else path
    with safe_open(str(weights_file), "pt") as fh:
        meta = json.loads(fh.metadata()["acestep_lora"])
    assert meta["rank"] == RANK and meta["alpha"] == ALPHA and meta["targets"] == ATTN
    assert meta["variant"] == "turbo" and meta["provenance"] == {"shift": 3.0, "trigger": "x"}


def test_export_key_layouts(trained, tmp_path):
    dec, _, _ = trained
    p = "layers.0.self_attn.q_proj"
    keys = {fmt: set(load_file(str(export_lora(dec, tmp_path / f"{fmt}.safetensors", fmt))))
            for fmt in ("acestep", "diffsynth", "comfyui")}
    assert {f"{p}.lora_A.weight", f"{p}.lora_B.weight"} <= keys["acestep"] and len(keys["acestep"]) == 32
    assert {f"{p}.lora_A.default.weight", f"{p}.lora_B.default.weight"} <= keys["diffsynth"]
    assert len(keys["diffsynth"]) == 32
    assert {f"base_model.model.{p}.lora_A.weight", f"base_model.model.{p}.lora_B.weight",
            f"base_model.model.{p}.alpha"} <= keys["comfyui"] and len(keys["comfyui"]) == 48
    generic = load_file(str(export_lora(dec, tmp_path / "g.safetensors", "comfyui", prefix="diffusion_model.decoder.")))
    assert f"diffusion_model.decoder.{p}.alpha" in generic
    folder = export_lora(dec, tmp_path / "adapter", "peft")
    cfg = json.loads((folder / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["task_type"] is None and cfg["r"] == RANK and cfg["lora_alpha"] == ALPHA
    assert sorted(cfg["target_modules"]) == sorted(MODULES)
    assert f"base_model.model.{p}.lora_A.weight" in load_file(str(folder / "adapter_model.safetensors"))
    bf16 = load_file(str(export_lora(dec, tmp_path / "b.safetensors", "diffsynth", dtype=torch.bfloat16)))
    assert {t.dtype for t in bf16.values()} == {torch.bfloat16}


def test_peft_folder_loads_with_peft_model_from_pretrained(trained, tmp_path):
    from peft import PeftModel

    dec, _, live = trained
    folder = export_lora(dec, tmp_path / "adapter", "peft")
    bare = fresh_decoder()
    pm = PeftModel.from_pretrained(bare, str(folder), is_trainable=False)  # official ACE-Step loader call
    with torch.no_grad():
        out = pm(*X)  # plain PeftModel (task_type null): the DiT's positional signature passes through
    assert rel_err(out, live) <= TOL
    assert rel_err(run(bare), live) <= TOL  # injected in place into the bare decoder as well
    # official strength slider: scaling = alpha/r × strength
    for m in bare.modules():
        if hasattr(m, "scaling") and "default" in m.scaling:
            m.scaling["default"] = 2.0 * 0.5
    assert rel_err(run(bare), run(merged_reference([(trained[1], 2.0, 0.5)]))) <= TOL


def test_diffsynth_file_loads_in_diffsynth(trained, tmp_path):
    """DiffSynth's ``GeneralLoRALoader`` fuses ``W += alpha · B @ A`` (alpha=1, its ``pipe.load_lora`` default) into
    DiffSynth's own ``AceStepDiTModel`` built from our base weights: same output as our loader and the live adapter."""
    import peers
    from diffsynth.utils.lora.general import GeneralLoRALoader

    dec, _, live = trained
    path = export_lora(dec, tmp_path / "ds.safetensors", "diffsynth")
    model = base_model()
    ds = peers.ds_dit(CFG, model.state_dict())
    with torch.no_grad():
        ds_base = peers.ds_dit_forward(ds, *X)
    assert rel_err(ds_base, run(model.decoder)) <= TOL
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf), warnings.catch_warnings():
        warnings.simplefilter("error")  # no "Alpha detected" rescaling: the file carries no alpha
        GeneralLoRALoader(torch_dtype=torch.float32).fuse_lora_to_base_model(ds, load_file(str(path)), alpha=1)
    assert f"{len(MODULES)} tensors are fused" in buf.getvalue()
    with torch.no_grad():
        ds_out = peers.ds_dit_forward(ds, *X)
    ours = fresh_decoder()
    load_adapters(ours, [path], fuse=True)
    assert rel_err(run(ours), ds_out) <= TOL
    assert rel_err(ds_out, live) <= TOL


def comfy_apply(model_sd: dict[str, torch.Tensor], lora: dict[str, torch.Tensor], strength: float):
    """ComfyUI's rule for an ACEStep15 model (docs/training.md §8.3, COMFY-L ``model_lora_keys_unet`` /
    ``LoRAAdapter.load``): ``base_model.model.{path}`` names ``diffusion_model.decoder.{path}.weight``; with a
    ``{stem}.alpha`` tensor ``scale = alpha / rank`` (rank = lora_A rows), without it ``scale = 1.0``;
    ``W += strength · scale · lora_B @ lora_A``. Returns the new state dict and the scale of each stem."""
    sd = dict(model_sd)
    scales = {}
    for key in lora:
        if not key.endswith(".lora_B.weight"):
            continue
        stem = key[: -len(".lora_B.weight")]
        assert stem.startswith("base_model.model.")
        up, down = lora[key], lora[f"{stem}.lora_A.weight"]
        scale = lora[f"{stem}.alpha"].item() / down.shape[0] if f"{stem}.alpha" in lora else 1.0
        target = "decoder." + stem[len("base_model.model."):] + ".weight"  # diffusion_model.decoder.{path}.weight
        sd[target] = sd[target] + strength * scale * (up.double() @ down.double()).float()
        scales[stem] = scale
    return sd, scales


def test_comfyui_alpha_semantics(trained, tmp_path):
    dec, pairs, live = trained
    path = export_lora(dec, tmp_path / "comfy.safetensors", "comfyui")
    model = base_model()
    sd, scales = comfy_apply(model.state_dict(), load_file(str(path)), strength=1.0)
    assert set(scales.values()) == {2.0}  # rank 8, alpha 16: strength 1.0 applies alpha/r = 2 as in training
    model.load_state_dict(sd)
    assert rel_err(run(model.decoder), live) <= TOL
    # Pitfall 7: the PEFT folder's weights file alone has no alpha tensor -> ComfyUI applies scale 1 (half strength).
    folder = export_lora(dec, tmp_path / "adapter", "peft")
    _, peft_scales = comfy_apply(base_model().state_dict(), load_file(str(folder / "adapter_model.safetensors")), 1.0)
    assert set(peft_scales.values()) == {1.0}
    # our reader follows the same rule for that file, and says so
    with pytest.warns(UserWarning, match="scale 1.0 as ComfyUI would"):
        f = read_lora(folder / "adapter_model.safetensors", format="comfyui")
    assert {w.scale for w in f.weights.values()} == {1.0}
    assert {w.scale for w in read_lora(folder).weights.values()} == {2.0}  # the folder has alpha in its config


def test_convert_between_formats(tmp_path, base_out):
    pairs = random_lora(seed=9)
    src, scale = write_peft(pairs, tmp_path / "official")
    ref = run(merged_reference([(pairs, scale, 1.0)]))
    for fmt, name in EXPORTS.items():
        dst = convert_lora(src, tmp_path / f"conv_{name}", fmt)
        dec = fresh_decoder()
        load_adapters(dec, [dst])
        assert rel_err(run(dec), ref) <= TOL, fmt


# ---- refusing adapters that do not fit ------------------------------------------------------------------------

def test_zero_match_raises(tmp_path):
    pairs = random_lora(seed=1)
    t = {}
    for p, (A, B) in pairs.items():
        t[f"text_encoder.{p}.lora_A.weight"], t[f"text_encoder.{p}.lora_B.weight"] = A, B
    save_file(t, str(tmp_path / "other.safetensors"))
    dec = fresh_decoder()
    w0 = dec.layers[0].self_attn.q_proj.weight.clone()
    with pytest.raises(LoraMatchError, match=r"0 of 16 LoRA modules match the model"):
        load_adapters(dec, [(tmp_path / "other.safetensors", 1.0)], fuse=True)
    assert torch.equal(dec.layers[0].self_attn.q_proj.weight, w0)
    # nothing is applied when one adapter of several does not match
    good, _ = write_comfyui(pairs, tmp_path / "good.safetensors")
    with pytest.raises(LoraMatchError, match="0 of 16"):
        load_adapters(dec, [good, tmp_path / "other.safetensors"], fuse=True)
    assert torch.equal(dec.layers[0].self_attn.q_proj.weight, w0)


def test_partial_match_warns_with_count_and_keys(base_out):
    pairs = random_lora(seed=1)
    weights = {(p if i % 2 else f"blocks.{p}"): LoraDelta(A, B, 2.0) for i, (p, (A, B)) in enumerate(pairs.items())}
    dec = fresh_decoder()
    with pytest.warns(UserWarning, match=r"only 8 of 16 LoRA modules match the model; 8 unmatched \(first: blocks\."):
        load_adapters(dec, [(weights, 1.0)])
    kept = {p: ab for i, (p, ab) in enumerate(pairs.items()) if i % 2}
    assert rel_err(run(dec), run(merged_reference([(kept, 2.0, 1.0)]))) <= TOL


def test_wrong_shapes_raise():
    wide = {p: LoraDelta(torch.randn(4, 96), torch.randn(96, 4), 1.0) for p in MODULES}  # another model width
    with pytest.raises(LoraMatchError, match="do not fit"):
        load_adapters(fresh_decoder(), [wide])


def test_unreadable_or_unsupported_files(tmp_path):
    save_file({"layers.0.self_attn.q_proj.lora_A.weight": torch.zeros(2, 64)}, str(tmp_path / "half.safetensors"))
    with pytest.raises(LoraError, match="only one of lora_A/lora_B"):
        read_lora(tmp_path / "half.safetensors")
    save_file({"lycoris_layers_0_self_attn_q_proj.lokr_w1": torch.zeros(2, 2)}, str(tmp_path / "lokr.safetensors"))
    with pytest.raises(LoraError, match="DoRA/LoKr"):
        read_lora(tmp_path / "lokr.safetensors")
    (tmp_path / "empty").mkdir()
    with pytest.raises(LoraError, match="adapter_config.json"):
        detect_format(tmp_path / "empty")


# ---- the training entry points (mode.fuse_loras, mode.init_lora) ------------------------------------------------

def test_fused_into_base_under_a_trainable_adapter(tmp_path):
    from acestep_train.lora import load_adapters_fused_into_base, trainable_report

    pairs = random_lora(seed=6)
    path, scale = write_comfyui(pairs, tmp_path / "style.safetensors")
    dec = fresh_decoder()
    apply_lora(dec, rank=4, alpha=4, target_modules=ATTN)
    before = trainable_report(dec)
    load_adapters_fused_into_base(dec, [(path, 0.5)])
    assert rel_err(run(dec), run(merged_reference([(pairs, scale, 0.5)]))) <= TOL
    after = trainable_report(dec)
    assert (after.trainable, after.other_trainable) == (before.trainable, [])


@pytest.mark.parametrize("fmt", list(EXPORTS))
def test_init_trainable_adapter_from_an_export(fmt, trained, tmp_path):
    from acestep_train.lora import load_adapter_into_trainable

    dec, _, live = trained
    path = export_lora(dec, tmp_path / EXPORTS[fmt], fmt)
    run_dec = fresh_decoder()
    apply_lora(run_dec, rank=RANK, alpha=4.0, target_modules=ATTN)  # another alpha: B is rescaled (x4)
    assert load_adapter_into_trainable(run_dec, path) == len(MODULES)
    assert rel_err(run(run_dec), live) <= TOL
    assert all(p.requires_grad for n, p in run_dec.named_parameters() if "lora_" in n)
    small = fresh_decoder()
    apply_lora(small, rank=4, alpha=8, target_modules=ATTN)
    with pytest.raises(LoraMatchError, match="rank differs"):
        load_adapter_into_trainable(small, path)
    narrow = fresh_decoder()
    apply_lora(narrow, rank=RANK, alpha=ALPHA, target_modules=r"layers\.\d+\.self_attn\.(q_proj|k_proj|v_proj|o_proj)")
    with pytest.raises(LoraMatchError, match="carry no 'default' adapter"):
        load_adapter_into_trainable(narrow, path)


def test_init_dora_adapter_from_an_export(tmp_path):
    from acestep_train.lora import load_adapter_into_trainable

    dec = fresh_decoder()
    apply_lora(dec, rank=4, alpha=8, target_modules=ATTN, use_dora=True)
    with torch.no_grad():
        for n, p in dec.named_parameters():
            if "lora_" in n:
                p.add_(0.1 * torch.randn_like(p))
    live = run(dec)
    path = export_lora(dec, tmp_path / "dora.safetensors")
    run_dec = fresh_decoder()
    apply_lora(run_dec, rank=4, alpha=8, target_modules=ATTN, use_dora=True)
    assert load_adapter_into_trainable(run_dec, path) == len(MODULES)
    assert rel_err(run(run_dec), live) <= TOL
    plain = fresh_decoder()
    apply_lora(plain, rank=4, alpha=8, target_modules=ATTN)
    with pytest.raises(LoraError):
        load_adapter_into_trainable(plain, path)  # a DoRA file has no (A, B, scale) form
