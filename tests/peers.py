"""Independent ACE-Step 1.5 implementations ("peers") loaded with *our* weights, for parity tests.

Two public re-implementations of the released network are built at the same (small) configuration as an
``AceStepConfig`` and loaded, with strict key checks, from our ``AceStepModel.state_dict()`` (released key names):

* DiffSynth-Studio (``diffsynth==2.1.12``): ``ace_step_dit.AceStepDiTModel``,
  ``ace_step_conditioner.AceStepConditionEncoder`` and ``ace_step_tokenizer.AceStepTokenizer`` (pooler + vendored
  ``ResidualFSQ`` + detokenizer). Its state-dict
  converters only strip ``decoder.`` / ``encoder.`` and move ``null_condition_emb`` into the conditioner; names below
  the prefix are the released ones.
* diffusers (``AceStepTransformer1DModel`` and the pipeline-side ``AceStepConditionEncoder``, ``AceStepAudioTokenizer``,
  ``AceStepAudioTokenDetokenizer``). Its converter (``scripts/convert_ace_step_to_diffusers.py``) renames keys, see
  ``DIFFUSERS_RENAMES``.

Call conventions that differ from ours (checked by reading the peer sources):

* DiffSynth's DiT builds ``TimestepEmbedding(scale=1)`` and its scheduler feeds ``sigma * 1000``; ours (like the
  official code and diffusers, ``scale=1000``) takes t in [0, 1]. ``ds_dit_forward`` multiplies t and r by 1000.
* DiffSynth picks an attention kernel at import (flash-attn 4/3/2, sage, xformers, else torch SDPA) from what is
  installed, or from ``DIFFSYNTH_ATTENTION_IMPLEMENTATION``. ``torch_attention()`` forces its torch path, where the
  sliding window is an explicit ``|i - j| <= W`` band (``torch_sdpa_sliding_window``).
* DiffSynth's DiT, conditioner and tokenizer take no padding masks (the lyric mask is used only for packing).
  diffusers' lyric encoder honours the lyric padding mask (like the official code); its DiT takes no masks at all.
* DiffSynth's tokenizer does not pad T to a multiple of 5 itself; its pipeline appends ``silence_latent[:1, :pad]``
  first (``AceStepPipeline...tokenize``); ``ds_tokenize`` does the same.
* DiffSynth's ``ResidualFSQ`` is built with ``force_quantization_f32=False``: it quantizes in the input dtype (bf16 in
  its bf16 pipeline). With fp32 inputs, as here, every step is fp32, the same as the official fp32 quantizer.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator, Mapping

import torch
from torch import nn

from acestep_train.models.config import AceStepConfig

# Key renaming from released names (below the ``decoder.`` / ``encoder.`` prefix) to diffusers module names, as in
# diffusers ``scripts/convert_ace_step_to_diffusers.py`` (``_remap_transformer_key`` / ``_remap_condition_encoder_key``
# plus the ``proj_in.1.`` / ``proj_out.1.`` replacement). Substring replacements, applied in order, first hit wins
# for the attention names. The same attention renames apply to the tokenizer / detokenizer blocks, which the
# converter drops but whose diffusers modules reuse ``AceStepAttention``.
DIFFUSERS_CONV_RENAMES = (("proj_in.1.", "proj_in_conv."), ("proj_out.1.", "proj_out_conv."))
DIFFUSERS_ATTN_RENAMES = (
    (".q_proj.", ".to_q."),
    (".k_proj.", ".to_k."),
    (".v_proj.", ".to_v."),
    (".o_proj.", ".to_out.0."),
    (".q_norm.", ".norm_q."),
    (".k_norm.", ".norm_k."),
)
DIFFUSERS_RENAMES = DIFFUSERS_CONV_RENAMES + DIFFUSERS_ATTN_RENAMES

# DiffSynth's DiT timestep embedding has scale 1; its scheduler passes sigma * 1000.
DS_TIMESTEP_SCALE = 1000.0


# ---- helpers ---------------------------------------------------------------------------------------------------
def _sub(sd: Mapping[str, torch.Tensor], prefix: str, keep_prefix: bool = False) -> dict[str, torch.Tensor]:
    return {(k if keep_prefix else k[len(prefix):]): v for k, v in sd.items() if k.startswith(prefix)}


def load_strict(module: nn.Module, sd: Mapping[str, torch.Tensor], what: str) -> nn.Module:
    """``load_state_dict`` that names every missing / unexpected key and every shape mismatch."""
    own = module.state_dict()
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    shapes = sorted(f"{k}: ours {tuple(sd[k].shape)} vs peer {tuple(own[k].shape)}"
                    for k in set(own) & set(sd) if own[k].shape != sd[k].shape)
    if missing or unexpected or shapes:
        raise AssertionError(f"{what}: missing={missing} unexpected={unexpected} shape mismatches={shapes}")
    module.load_state_dict(dict(sd), strict=True)
    return module.eval()


def _rename_diffusers(key: str, conv: bool) -> str:
    if conv:
        for old, new in DIFFUSERS_CONV_RENAMES:
            key = key.replace(old, new)
    for old, new in DIFFUSERS_ATTN_RENAMES:
        if old in key:
            return key.replace(old, new)
    return key


def _encoder_kwargs(cfg: AceStepConfig) -> dict:
    """Encoder-width block sizes, as the official ``encoder_config`` copy (docs/architecture.md §3)."""
    return cfg.encoder_block_kwargs()


def _common_kwargs(cfg: AceStepConfig) -> dict:
    return dict(
        head_dim=cfg.head_dim,
        rms_norm_eps=cfg.rms_norm_eps,
        rope_theta=cfg.rope_theta,
        attention_bias=cfg.attention_bias,
        attention_dropout=cfg.attention_dropout,
        sliding_window=cfg.sliding_window,
    )


@contextlib.contextmanager
def torch_attention() -> Iterator[None]:
    """Force DiffSynth's torch-SDPA attention path (it reads a module global on every call)."""
    import diffsynth.core.attention  # noqa: F401  (loads the submodule)

    mod = sys.modules["diffsynth.core.attention.attention"]
    old = mod.ATTENTION_IMPLEMENTATION
    mod.ATTENTION_IMPLEMENTATION = "torch"
    try:
        yield
    finally:
        mod.ATTENTION_IMPLEMENTATION = old


# ---- DiffSynth -------------------------------------------------------------------------------------------------
def ds_dit(cfg: AceStepConfig, sd: Mapping[str, torch.Tensor]) -> nn.Module:
    from diffsynth.models.ace_step_dit import AceStepDiTModel
    from diffsynth.utils.state_dict_converters.ace_step_dit import AceStepDiTModelStateDictConverter

    model = AceStepDiTModel(
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers,
        num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_key_value_heads,
        layer_types=list(cfg.layer_types),
        use_sliding_window=cfg.use_sliding_window,
        max_position_embeddings=cfg.max_position_embeddings,
        patch_size=cfg.patch_size,
        in_channels=cfg.in_channels,
        audio_acoustic_hidden_dim=cfg.audio_acoustic_hidden_dim,
        encoder_hidden_size=cfg.encoder_width,
        **_common_kwargs(cfg),
    )
    return load_strict(model, AceStepDiTModelStateDictConverter(dict(sd)), "diffsynth DiT")


def ds_dit_forward(model: nn.Module, hidden_states, timestep, timestep_r, encoder_hidden_states, context_latents):
    """DiffSynth DiT velocity; t, r in [0, 1] like ours (scaled by 1000 here, as its scheduler does)."""
    with torch_attention():
        out = model(
            hidden_states=hidden_states,
            timestep=timestep * DS_TIMESTEP_SCALE,
            timestep_r=timestep_r * DS_TIMESTEP_SCALE,
            attention_mask=None,
            encoder_hidden_states=encoder_hidden_states,
            encoder_attention_mask=None,
            context_latents=context_latents,
        )
    return out[0]


def ds_conditioner(cfg: AceStepConfig, sd: Mapping[str, torch.Tensor]) -> nn.Module:
    from diffsynth.models.ace_step_conditioner import AceStepConditionEncoder
    from diffsynth.utils.state_dict_converters.ace_step_conditioner import AceStepConditionEncoderStateDictConverter

    model = AceStepConditionEncoder(
        **_encoder_kwargs(cfg),
        layer_types=list(cfg.layer_types),
        use_sliding_window=cfg.use_sliding_window,
        max_position_embeddings=cfg.max_position_embeddings,
        text_hidden_dim=cfg.text_hidden_dim,
        timbre_hidden_dim=cfg.timbre_hidden_dim,
        num_lyric_encoder_hidden_layers=cfg.num_lyric_encoder_hidden_layers,
        num_timbre_encoder_hidden_layers=cfg.num_timbre_encoder_hidden_layers,
        **_common_kwargs(cfg),
    )
    return load_strict(model, AceStepConditionEncoderStateDictConverter(dict(sd)), "diffsynth conditioner")


def ds_conditioner_forward(model: nn.Module, text, text_mask, lyric, lyric_mask, refer_packed, refer_order):
    """DiffSynth condition encoder. Masks are converted to long (its packing concatenates them with a long mask)."""
    with torch_attention():
        return model(
            text_hidden_states=text,
            text_attention_mask=text_mask.long(),
            lyric_hidden_states=lyric,
            lyric_attention_mask=lyric_mask.long(),
            reference_latents=refer_packed,
            refer_audio_order_mask=refer_order,
        )


def ds_tokenizer(cfg: AceStepConfig, sd: Mapping[str, torch.Tensor]) -> nn.Module:
    """DiffSynth ``AceStepTokenizer`` container: ``.tokenizer`` (pooler + ResidualFSQ) and ``.detokenizer``."""
    from diffsynth.models.ace_step_tokenizer import AceStepTokenizer
    from diffsynth.utils.state_dict_converters.ace_step_tokenizer import AceStepTokenizerStateDictConverter

    model = AceStepTokenizer(
        **_encoder_kwargs(cfg),
        layer_types=list(cfg.layer_types),
        use_sliding_window=cfg.use_sliding_window,
        max_position_embeddings=cfg.max_position_embeddings,
        audio_acoustic_hidden_dim=cfg.audio_acoustic_hidden_dim,
        pool_window_size=cfg.pool_window_size,
        fsq_dim=cfg.fsq_dim,
        fsq_input_levels=list(cfg.fsq_input_levels),
        fsq_input_num_quantizers=cfg.fsq_input_num_quantizers,
        num_attention_pooler_hidden_layers=cfg.num_attention_pooler_hidden_layers,
        **_common_kwargs(cfg),
    )
    return load_strict(model, AceStepTokenizerStateDictConverter(dict(sd)), "diffsynth tokenizer")


def ds_tokenize(model: nn.Module, latents: torch.Tensor, silence_latent: torch.Tensor | None = None):
    """[B,T,64] -> (quantized [B,T/5,W], indices [B,T/5,Q]); pads T like DiffSynth's pipeline (silence frames)."""
    w = model.tokenizer.pool_window_size
    pad = (-latents.shape[1]) % w
    if pad:
        if silence_latent is None:
            raise ValueError("T is not a multiple of the pool window: pass silence_latent [1, >=pad, 64]")
        latents = torch.cat([latents, silence_latent[:1, :pad].repeat(latents.shape[0], 1, 1)], dim=1)
    with torch_attention():
        return model.tokenizer.tokenize(latents)


def ds_detokenize(model: nn.Module, quantized: torch.Tensor) -> torch.Tensor:
    with torch_attention():
        return model.detokenizer(quantized)


# ---- diffusers -------------------------------------------------------------------------------------------------
def diffusers_state_dict(sd: Mapping[str, torch.Tensor], prefix: str, conv: bool = False) -> dict[str, torch.Tensor]:
    """Released keys under ``prefix`` -> diffusers names (prefix stripped)."""
    return {_rename_diffusers(k, conv): v for k, v in _sub(sd, prefix).items()}


def diffusers_dit(cfg: AceStepConfig, sd: Mapping[str, torch.Tensor]) -> nn.Module:
    from diffusers.models.transformers.ace_step_transformer import AceStepTransformer1DModel

    model = AceStepTransformer1DModel(
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers,
        num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_key_value_heads,
        in_channels=cfg.in_channels,
        audio_acoustic_hidden_dim=cfg.audio_acoustic_hidden_dim,
        patch_size=cfg.patch_size,
        layer_types=list(cfg.layer_types[: cfg.num_hidden_layers]),
        encoder_hidden_size=cfg.encoder_width,
        **_common_kwargs(cfg),
    )
    model.set_attention_backend("native")
    return load_strict(model, diffusers_state_dict(sd, "decoder.", conv=True), "diffusers transformer")


def diffusers_dit_forward(model: nn.Module, hidden_states, timestep, timestep_r, encoder_hidden_states,
                          context_latents) -> torch.Tensor:
    """diffusers DiT velocity; its ``AceStepTimestepEmbedding`` has scale 1000, so t, r in [0, 1] as ours."""
    return model(hidden_states=hidden_states, timestep=timestep, timestep_r=timestep_r,
                 encoder_hidden_states=encoder_hidden_states, context_latents=context_latents,
                 return_dict=False)[0]


def diffusers_condition_encoder(cfg: AceStepConfig, sd: Mapping[str, torch.Tensor],
                                silence_latent: torch.Tensor | None = None) -> nn.Module:
    """diffusers pipeline ``AceStepConditionEncoder`` (it honours the lyric padding mask, like the official code).

    Its persistent ``silence_latent`` buffer [1,15000,timbre_dim] is not a checkpoint tensor (the converter bakes in
    ``silence_latent.pt``): filled from ``silence_latent`` or zeros; the forward used here does not read it.
    """
    from diffusers.pipelines.ace_step.modeling_ace_step import AceStepConditionEncoder

    model = AceStepConditionEncoder(
        **_encoder_kwargs(cfg),
        text_hidden_dim=cfg.text_hidden_dim,
        timbre_hidden_dim=cfg.timbre_hidden_dim,
        num_lyric_encoder_hidden_layers=cfg.num_lyric_encoder_hidden_layers,
        num_timbre_encoder_hidden_layers=cfg.num_timbre_encoder_hidden_layers,
        layer_types=list(cfg.layer_types[: cfg.num_lyric_encoder_hidden_layers]),
        **_common_kwargs(cfg),
    )
    if model.timbre_encoder._layer_types != cfg.layer_types[: cfg.num_timbre_encoder_hidden_layers]:
        raise AssertionError("diffusers' timbre encoder always uses the default layer_types rule")
    model.set_attention_backend("native")
    weights = diffusers_state_dict(sd, "encoder.")
    weights["null_condition_emb"] = sd["null_condition_emb"]
    buf = model.silence_latent
    weights["silence_latent"] = (torch.zeros_like(buf) if silence_latent is None
                                 else silence_latent[:, : buf.shape[1]].to(buf.dtype))
    return load_strict(model, weights, "diffusers condition encoder")


def diffusers_condition_encoder_forward(model: nn.Module, text, text_mask, lyric, lyric_mask, refer_packed,
                                        refer_order):
    return model(text_hidden_states=text, text_attention_mask=text_mask.long(), lyric_hidden_states=lyric,
                 lyric_attention_mask=lyric_mask.long(),
                 refer_audio_acoustic_hidden_states_packed=refer_packed, refer_audio_order_mask=refer_order)


def diffusers_tokenizer(cfg: AceStepConfig, sd: Mapping[str, torch.Tensor]) -> tuple[nn.Module, nn.Module]:
    """diffusers pipeline ``AceStepAudioTokenizer`` and ``AceStepAudioTokenDetokenizer`` (its own fp32 FSQ)."""
    from diffusers.pipelines.ace_step.modeling_ace_step import AceStepAudioTokenDetokenizer, AceStepAudioTokenizer

    n = cfg.num_attention_pooler_hidden_layers
    common = dict(**_encoder_kwargs(cfg), audio_acoustic_hidden_dim=cfg.audio_acoustic_hidden_dim,
                  pool_window_size=cfg.pool_window_size, num_attention_pooler_hidden_layers=n,
                  layer_types=list(cfg.layer_types[:n]), **_common_kwargs(cfg))
    tok = AceStepAudioTokenizer(**common, fsq_dim=cfg.fsq_dim, fsq_input_levels=list(cfg.fsq_input_levels),
                                fsq_input_num_quantizers=cfg.fsq_input_num_quantizers)
    detok = AceStepAudioTokenDetokenizer(**common)
    for m in (tok, detok):
        m.set_attention_backend("native")
    load_strict(tok, diffusers_state_dict(sd, "tokenizer."), "diffusers audio tokenizer")
    load_strict(detok, diffusers_state_dict(sd, "detokenizer."), "diffusers audio detokenizer")
    return tok, detok
