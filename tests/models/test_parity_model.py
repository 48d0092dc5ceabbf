"""Numerical parity of our DiT, condition encoder and audio (de)tokenizer with two independent implementations.

Peers (``tests/peers.py``): DiffSynth-Studio's ACE-Step modules and diffusers' ``AceStepTransformer1DModel`` plus its
pipeline-side condition encoder / tokenizer / detokenizer, all loaded with strict key checks from our random
weights, at small but structurally complete configs, in fp32 on CPU. Metric: max |ours - peer| / max |peer|.

Where we deliberately differ (padding masks: the released DiT attends to padded frames and tokens, we do not when
given masks), we check that (a) without padding we agree, (b) with padding the valid outputs equal the peers' output
on the unpadded item alone, and (c) garbage written into padded frames/tokens leaves valid outputs unchanged.
"""

from __future__ import annotations

import pytest
import torch

import peers
from acestep_train.models import AceStepConfig, AceStepModel
from numerics import rel_err

TOL = 1e-5  # relative parity bound (fp32)
NOISE = 1e-6  # "identical up to fp32 noise" for invariance checks

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")

# Small, structurally complete configs. sliding_window=4 with 12 DiT tokens (T=23), 12 lyric tokens, 30 timbre
# frames and 6-token pooler windows, so the band is active everywhere, including inside the pooler (|0 - 5| > 4).
SMALL = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
             head_dim=16, sliding_window=4, text_hidden_dim=32, timbre_hidden_dim=64,
             num_lyric_encoder_hidden_layers=2, num_timbre_encoder_hidden_layers=2,
             num_attention_pooler_hidden_layers=2, fsq_dim=64)
# XL-like: DiT wider than the encoder (condition_embedder 64 -> 96), heads*head_dim != hidden in the DiT (8*16=128
# vs 96, GQA 4:1) and in the encoder blocks (6*16=96 vs 64, GQA 3:1); encoder/tokenizer/detokenizer 64 wide.
XL = dict(SMALL, hidden_size=96, intermediate_size=192, num_attention_heads=8, num_key_value_heads=2,
          encoder_hidden_size=64, encoder_intermediate_size=128, encoder_num_attention_heads=6,
          encoder_num_key_value_heads=2)
CONFIGS = {"2B-like": SMALL, "XL-like": XL}


def _randomize(model: AceStepModel) -> AceStepModel:
    """Make every released tensor matter: norm weights off 1, learned tokens well above their 0.02 init."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or name.endswith("layernorm.weight"):
                p.copy_(1 + 0.3 * torch.randn(p.shape, generator=g))
            elif name.endswith(("special_token", "special_tokens", "null_condition_emb")):
                p.copy_(torch.randn(p.shape, generator=g))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    return model.eval()


class Bundle:
    """Our model and its peers at one config, built once per module."""

    def __init__(self, name: str):
        torch.manual_seed(0)
        self.name = name
        self.cfg = AceStepConfig(**CONFIGS[name])
        self.model = _randomize(AceStepModel(self.cfg))
        sd = self.model.state_dict()
        self.sd = sd
        self.silence = torch.randn(1, 40, 64, generator=torch.Generator().manual_seed(2))
        self.ds_dit = peers.ds_dit(self.cfg, sd)
        self.df_dit = peers.diffusers_dit(self.cfg, sd)
        self.ds_cond = peers.ds_conditioner(self.cfg, sd)
        self.df_cond = peers.diffusers_condition_encoder(self.cfg, sd)
        self.ds_tok = peers.ds_tokenizer(self.cfg, sd)
        self.df_tok, self.df_detok = peers.diffusers_tokenizer(self.cfg, sd)


@pytest.fixture(scope="module", params=list(CONFIGS))
def b(request) -> Bundle:
    return Bundle(request.param)


@pytest.fixture(autouse=True)
def _no_grad():
    with torch.no_grad():
        yield


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ---- DiT -------------------------------------------------------------------------------------------------------
def _dit_inputs(b: Bundle, T: int = 23, L: int = 7, batch: int = 2, seed: int = 10):
    g = _gen(seed)
    x = torch.randn(batch, T, 64, generator=g)
    ctx = torch.randn(batch, T, 128, generator=g)
    enc = torch.randn(batch, L, b.cfg.encoder_width, generator=g)
    return x, ctx, enc


@pytest.mark.parametrize("r_equals_t", [True, False], ids=["r=t", "r<t"])
def test_dit_velocity_matches_diffsynth_and_diffusers(b: Bundle, r_equals_t: bool):
    # T = 23 frames: odd (the patch pads one zero frame), 12 tokens > 2 * window + 1 so the band cuts.
    x, ctx, enc = _dit_inputs(b)
    t = torch.tensor([0.3, 0.9545])
    r = t.clone() if r_equals_t else torch.tensor([0.1, 0.5])
    ours = b.model.decoder(x, t, r, enc, ctx)
    assert ours.shape == x.shape
    ds = peers.ds_dit_forward(b.ds_dit, x, t, r, enc, ctx)
    df = peers.diffusers_dit_forward(b.df_dit, x, t, r, enc, ctx)
    e_ds, e_df = rel_err(ours, ds), rel_err(ours, df)
    print(f"\n[{b.name} {'r=t' if r_equals_t else 'r<t'}] DiT rel err: diffsynth {e_ds:.2e}  diffusers {e_df:.2e}")
    assert e_ds <= TOL and e_df <= TOL

    # Cross-attention K/V precomputed once (sampling cache) is the same computation.
    cached = b.model.decoder(x, t, r, None, ctx, cross_kv=b.model.decoder.cross_kv(enc))
    assert rel_err(cached, ours) <= NOISE

    # All-valid masks are the unmasked computation.
    ones_t, ones_l = torch.ones(x.shape[:2], dtype=torch.bool), torch.ones(enc.shape[:2], dtype=torch.bool)
    masked = b.model.decoder(x, t, r, enc, ctx, attention_mask=ones_t, encoder_attention_mask=ones_l)
    assert rel_err(masked, ours) <= NOISE


def test_dit_sliding_window_is_exercised(b: Bundle):
    """The DiT comparison would catch a wrong band: the peer without its window differs by far more than TOL."""
    x, ctx, enc = _dit_inputs(b)
    t = torch.tensor([0.3, 0.9])
    ours = b.model.decoder(x, t, t, enc, ctx)
    saved = b.ds_dit.sliding_window
    b.ds_dit.sliding_window = None  # read at forward time -> full attention in every layer
    try:
        full = peers.ds_dit_forward(b.ds_dit, x, t, t, enc, ctx)
    finally:
        b.ds_dit.sliding_window = saved
    assert rel_err(ours, full) > 1e-3


def test_dit_padding_masks(b: Bundle):
    """Padded frames/tokens: valid outputs equal the peers on the unpadded item and ignore padded content."""
    x, ctx, enc = _dit_inputs(b, seed=11)
    t = torch.tensor([0.6, 0.25])
    n_valid, l_valid = [15, 23], [4, 7]  # item 0: 15 frames (odd: frame 15 shares a patch with frame 14), 4 tokens
    am = torch.arange(23)[None] < torch.tensor(n_valid)[:, None]
    em = torch.arange(7)[None] < torch.tensor(l_valid)[:, None]
    out = b.model.decoder(x, t, t, enc, ctx, attention_mask=am, encoder_attention_mask=em)

    # (b) each item's valid frames == peers run on that item alone, without padding.
    for i, (n, l) in enumerate(zip(n_valid, l_valid)):
        args = (x[i:i + 1, :n], t[i:i + 1], t[i:i + 1], enc[i:i + 1, :l], ctx[i:i + 1, :n])
        for name, ref in (("diffsynth", peers.ds_dit_forward(b.ds_dit, *args)),
                          ("diffusers", peers.diffusers_dit_forward(b.df_dit, *args))):
            e = rel_err(out[i:i + 1, :n], ref)
            print(f"\n[{b.name}] padded DiT item {i} vs {name} on the unpadded item: {e:.2e}")
            assert e <= TOL

    # (c) garbage in padded frames (x and context) and padded condition tokens changes nothing valid.
    g = _gen(12)
    x2, ctx2, enc2 = x.clone(), ctx.clone(), enc.clone()
    x2[~am] = 100 * torch.randn(int((~am).sum()), 64, generator=g)
    ctx2[~am] = 100 * torch.randn(int((~am).sum()), 128, generator=g)
    enc2[~em] = 100 * torch.randn(int((~em).sum()), enc.shape[-1], generator=g)
    out2 = b.model.decoder(x2, t, t, enc2, ctx2, attention_mask=am, encoder_attention_mask=em)
    assert torch.isfinite(out2).all()
    assert rel_err(out2[am], out[am]) <= NOISE
    # ... while without masks the same garbage does reach valid frames (the check above is not vacuous).
    leaky = b.model.decoder(x2, t, t, enc2, ctx2)
    assert rel_err(leaky[am], out[am]) > 1e-3


# ---- condition encoder -----------------------------------------------------------------------------------------
def _cond_inputs(b: Bundle, Lt: int = 6, Ll: int = 12, frames: int = 30, seed: int = 20):
    g = _gen(seed)
    text = torch.randn(2, Lt, b.cfg.text_hidden_dim, generator=g)
    lyric = torch.randn(2, Ll, b.cfg.text_hidden_dim, generator=g)
    refer = torch.randn(3, frames, b.cfg.timbre_hidden_dim, generator=g)
    order = torch.tensor([1, 0, 1])  # item 0 has one reference, item 1 two (unsorted on purpose)
    text_mask = torch.ones(2, Lt, dtype=torch.bool)
    text_mask[0, -2:] = False  # caption padding only affects packing, which every implementation does
    lyric_mask = torch.ones(2, Ll, dtype=torch.bool)
    return text, text_mask, lyric, lyric_mask, refer, order


def test_condition_encoder_matches_peers_without_lyric_padding(b: Bundle):
    args = _cond_inputs(b)
    enc, mask = b.model.encoder(*args)
    ds_enc, ds_mask = peers.ds_conditioner_forward(b.ds_cond, *args)
    df_enc, df_mask = peers.diffusers_condition_encoder_forward(b.df_cond, *args)
    assert enc.shape == ds_enc.shape == df_enc.shape
    assert torch.equal(mask, ds_mask.bool()) and torch.equal(mask, df_mask.bool())
    # Padded slots of the packed sequence hold whatever each implementation leaves there; compare valid ones.
    e_ds, e_df = rel_err(enc[mask], ds_enc[mask]), rel_err(enc[mask], df_enc[mask])
    print(f"\n[{b.name}] condition encoder rel err: diffsynth {e_ds:.2e}  diffusers {e_df:.2e}")
    assert e_ds <= TOL and e_df <= TOL


def test_condition_encoder_padded_lyrics(b: Bundle):
    text, text_mask, lyric, lyric_mask, refer, order = _cond_inputs(b, seed=21)
    lyric_mask[0, 3:] = False  # 3 valid of 12: padded queries 8..11 have no valid key inside the +-4 band
    args = (text, text_mask, lyric, lyric_mask, refer, order)
    enc, mask = b.model.encoder(*args)
    assert torch.isfinite(enc).all(), "padded rows must stay finite (a NaN there poisons any later masked sum)"

    # diffusers' lyric encoder honours the padding mask, like the official code.
    df_enc, df_mask = peers.diffusers_condition_encoder_forward(b.df_cond, *args)
    assert torch.equal(mask, df_mask.bool())
    e_df = rel_err(enc[mask], df_enc[mask])
    # DiffSynth ignores the lyric mask; it must agree on item 0 run alone with its 3 valid lyric tokens.
    sel = order == 0
    ds_enc, ds_mask = peers.ds_conditioner_forward(
        b.ds_cond, text[:1], text_mask[:1], lyric[:1, :3], lyric_mask[:1, :3], refer[sel], order[sel])
    n = int(ds_mask.sum())
    assert int(mask[0].sum()) == n
    e_ds = rel_err(enc[0, :n], ds_enc[0, :n])
    print(f"\n[{b.name}] padded lyrics rel err: diffusers (masked) {e_df:.2e}  diffsynth (item alone) {e_ds:.2e}")
    assert e_df <= TOL and e_ds <= TOL

    # Garbage in padded lyric and caption positions leaves every valid output unchanged.
    g = _gen(22)
    lyric2, text2 = lyric.clone(), text.clone()
    lyric2[~lyric_mask] = 100 * torch.randn(int((~lyric_mask).sum()), lyric.shape[-1], generator=g)
    text2[~text_mask] = 100 * torch.randn(int((~text_mask).sum()), text.shape[-1], generator=g)
    enc2, mask2 = b.model.encoder(text2, text_mask, lyric2, lyric_mask, refer, order)
    assert torch.equal(mask2, mask)
    assert rel_err(enc2[mask], enc[mask]) <= NOISE


# ---- audio tokenizer / detokenizer -----------------------------------------------------------------------------
def _fsq_margin(quantizer, pooled: torch.Tensor) -> torch.Tensor:
    """Distance of each FSQ input to its nearest rounding boundary, min over the code dims: ``[B, T5]``.

    Mirrors the (DiffSynth / vector-quantize-pytorch) ResidualFSQ: soft clamp ``tanh(z/c)*c``, hard clamp to
    [-1, 1], symmetric grid ``floor((L-1)(z+1)/2 + 1/2)`` (one quantizer, scale 1).
    """
    levels = torch.tensor(quantizer.levels, dtype=torch.float64)
    z = torch.nn.functional.linear(pooled.double(), quantizer.project_in.weight.double(),
                                   quantizer.project_in.bias.double())
    c = 1 + 1 / (levels - 1)
    z = ((z / c).tanh() * c).clamp(-1, 1)
    bracket = (levels - 1) * (z + 1) / 2 + 0.5
    return (bracket - bracket.round()).abs().amin(-1)


def _pooled(tokenizer, latents: torch.Tensor) -> torch.Tensor:
    """Pooler output of a tokenizer (ours or DiffSynth's, same attribute names) on [B, T5*5, 64] latents."""
    bsz, t, d = latents.shape
    h = tokenizer.audio_acoustic_proj(latents.reshape(bsz, t // 5, 5, d))
    return tokenizer.attention_pooler(h)


def test_tokenizer_and_detokenizer_match_peers(b: Bundle):
    cfg = b.cfg
    g = _gen(30)
    latents = torch.randn(2, 23, 64, generator=g)  # 23 -> padded with 2 silence frames to 25 = 5 codes
    padded = torch.cat([latents, b.silence[:, :2].expand(2, -1, -1)], dim=1)

    with peers.torch_attention():
        # 1. pooler (continuous): ours vs DiffSynth vs diffusers
        pooled = _pooled(b.model.tokenizer, padded)
        ds_pooled = _pooled(b.ds_tok.tokenizer, padded)
        df_pooled = b.df_tok.attention_pooler(b.df_tok.audio_acoustic_proj(padded.reshape(2, 5, 5, 64)))
        e_pool = max(rel_err(pooled, ds_pooled), rel_err(pooled, df_pooled))

        # 2. quantizer on one identical input: identical codes, same quantized vectors
        q, idx = b.model.tokenizer.quantizer(ds_pooled)
        ds_q, ds_idx = b.ds_tok.tokenizer.quantizer(ds_pooled)
        df_q, df_idx = b.df_tok.quantizer(ds_pooled)
    assert idx.shape == ds_idx.shape == (2, 5, cfg.fsq_input_num_quantizers)
    assert torch.equal(idx.long(), ds_idx.long()) and torch.equal(idx.long(), df_idx.long())
    e_q = max(rel_err(q, ds_q), rel_err(q, df_q))
    assert len(torch.unique(idx)) > 3, "degenerate codes: the comparison would not exercise the FSQ grid"

    # 3. end to end tokenize (with silence padding). Codes may only differ where the FSQ input sits within fp32
    # noise of a rounding boundary; the chosen seeds keep every input far from one, which we check explicitly.
    quantized, indices = b.model.tokenizer.tokenize(latents, b.silence)
    ds_quantized, ds_indices = peers.ds_tokenize(b.ds_tok, latents, b.silence)
    df_quantized, df_indices = b.df_tok.tokenize(latents, b.silence)
    margin = _fsq_margin(b.ds_tok.tokenizer.quantizer, ds_pooled)
    assert margin.min() > 1e-4, f"an FSQ input lies {margin.min():.1e} from a rounding boundary: pick another seed"
    assert torch.equal(indices.long(), ds_indices.long()) and torch.equal(indices.long(), df_indices.long())
    e_tok = max(rel_err(quantized, ds_quantized), rel_err(quantized, df_quantized))

    # 4. detokenizer on one identical input, then tokenize -> detokenize end to end (cropped like prepare_condition)
    with peers.torch_attention():
        hints = b.model.detokenizer(ds_quantized)
        e_detok = max(rel_err(hints, peers.ds_detokenize(b.ds_tok, ds_quantized)),
                      rel_err(hints, b.df_detok(ds_quantized)))
    ours_e2e = b.model.latents_to_hints(latents, b.silence)
    ds_e2e = peers.ds_detokenize(b.ds_tok, ds_quantized)[:, :23]
    df_e2e = b.df_detok(df_quantized)[:, :23]
    assert ours_e2e.shape == latents.shape
    e_e2e = max(rel_err(ours_e2e, ds_e2e), rel_err(ours_e2e, df_e2e))
    print(f"\n[{b.name}] tokenizer rel err: pooler {e_pool:.2e}  quantizer {e_q:.2e}  tokenize {e_tok:.2e}  "
          f"detokenizer {e_detok:.2e}  tokenize->detokenize {e_e2e:.2e}  (min FSQ margin {margin.min():.2e})")
    assert max(e_pool, e_q, e_tok, e_detok, e_e2e) <= TOL

    # 5. codes -> hints (LM audio-code path): same as detokenizing the tokenizer's own output
    assert rel_err(b.model.codes_to_hints(indices), hints) <= TOL


def test_peer_loaders_are_strict(b: Bundle):
    """Every released tensor reaches each peer: dropping one key is reported by name."""
    sd = dict(b.sd)
    key = next(k for k in sd if k.startswith("decoder.layers.0.cross_attn.k_norm"))
    sd.pop(key)
    with pytest.raises(AssertionError, match="cross_attn"):
        peers.ds_dit(b.cfg, sd)
    with pytest.raises(AssertionError, match="norm_k"):
        peers.diffusers_dit(b.cfg, sd)
