"""Text encoder: Qwen3-Embedding-0.6B (transformers ``Qwen3Model``) plus its tokenizer (``docs/pipeline.md`` §4).

Captions go through the whole model (``last_hidden_state``, no pooling, no normalisation); lyrics only through
``embed_tokens`` (the DiT's own lyric encoder processes them). The model is frozen in ACE-Step training, so both
calls run under ``torch.no_grad()``.

Special tokens are whatever the loaded tokenizer adds (``docs/pipeline.md`` §10 q6): we never add or strip any by hand.
Padding is forced to the right: Qwen3 is causal, so with right padding every real token sees exactly what it
would see unpadded (same positions, same context) and a caption's encoding does not depend on its batch-mates.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import AutoTokenizer, PreTrainedTokenizerBase, Qwen3Config, Qwen3Model

# Qwen3-Embedding-0.6B architecture (docs/pipeline.md §4.1; DiffSynth AceStepTextEncoder uses the same values).
RELEASED_QWEN3_CONFIG: dict[str, Any] = {
    "vocab_size": 151669,
    "hidden_size": 1024,
    "intermediate_size": 3072,
    "num_hidden_layers": 28,
    "num_attention_heads": 16,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "hidden_act": "silu",
    "max_position_embeddings": 32768,
    "rms_norm_eps": 1e-6,
    "rope_theta": 1_000_000.0,
    "attention_bias": False,
    "attention_dropout": 0.0,
    "tie_word_embeddings": True,
    "use_sliding_window": False,
    "sliding_window": None,
    "max_window_layers": 28,
    "bos_token_id": 151643,
    "eos_token_id": 151643,
    "pad_token_id": 151643,
}

DEFAULT_MAX_CAPTION_TOKENS = 256
DEFAULT_MAX_LYRIC_TOKENS = 2048

_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


class TextEncoder(nn.Module):
    """Qwen3 text encoder + tokenizer. ``self.model.state_dict()`` keys are the released file's keys."""

    def __init__(
        self,
        model: Qwen3Model,
        tokenizer: PreTrainedTokenizerBase,
        *,
        max_caption_tokens: int = DEFAULT_MAX_CAPTION_TOKENS,
        max_lyric_tokens: int = DEFAULT_MAX_LYRIC_TOKENS,
    ):
        super().__init__()
        if not isinstance(model, Qwen3Model):
            raise TypeError(f"TextEncoder wraps a transformers Qwen3Model, got {type(model).__name__}")
        if tokenizer.pad_token_id is None:
            raise ValueError(f"tokenizer {type(tokenizer).__name__} has no pad token; batches cannot be padded")
        if len(tokenizer) > model.config.vocab_size:
            raise ValueError(
                f"tokenizer has {len(tokenizer)} tokens but the model's vocab_size is {model.config.vocab_size}"
            )
        self.model = model
        self.tokenizer = tokenizer
        self.max_caption_tokens = max_caption_tokens
        self.max_lyric_tokens = max_lyric_tokens

    # ------------------------------------------------------------------ construction / IO
    @classmethod
    def from_config(
        cls,
        qwen3_config: dict[str, Any],
        tokenizer: PreTrainedTokenizerBase,
        *,
        dtype: torch.dtype = torch.float32,
        **limits: int,
    ) -> "TextEncoder":
        """Randomly initialised encoder (e.g. ``TINY_QWEN3_CONFIG`` with ``build_tiny_tokenizer()``)."""
        model = Qwen3Model(Qwen3Config(**qwen3_config)).to(dtype).eval()
        return cls(model, tokenizer, **limits)

    @classmethod
    def from_pretrained(
        cls, folder: str | Path, dtype: torch.dtype = torch.float32, **limits: int
    ) -> "TextEncoder":
        """Load a ``Qwen3-Embedding-0.6B/`` folder (config, safetensors weights, tokenizer files). All weights must
        match the architecture exactly: missing, unexpected or mis-shaped tensors raise."""
        folder = Path(folder)
        if not folder.is_dir():
            raise FileNotFoundError(f"text encoder folder not found: {folder}")
        config_path = folder / "config.json"
        if not config_path.is_file():
            raise FileNotFoundError(f"text encoder folder {folder} has no config.json (expected {config_path})")
        if not any((folder / f).is_file() for f in _WEIGHT_FILES):
            raise FileNotFoundError(
                f"text encoder folder {folder} has no weights: expected one of {list(_WEIGHT_FILES)}"
            )
        if not any((folder / f).is_file() for f in _TOKENIZER_FILES):
            raise FileNotFoundError(
                f"text encoder folder {folder} has no tokenizer: expected one of {list(_TOKENIZER_FILES)}"
            )
        try:
            model_type = json.loads(config_path.read_text()).get("model_type")
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"cannot read {config_path}: {e}") from e
        if model_type != "qwen3":
            raise ValueError(f"{config_path}: model_type is {model_type!r}, expected 'qwen3'")
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(folder))
        except Exception as e:  # noqa: BLE001 - re-raised naming the folder; original chained
            raise RuntimeError(f"could not load the tokenizer from {folder}: {e}") from e
        try:
            model, info = Qwen3Model.from_pretrained(
                str(folder), dtype=dtype, output_loading_info=True, use_safetensors=True
            )
        except Exception as e:  # noqa: BLE001
            raise RuntimeError(f"could not load Qwen3 weights from {folder} ({list(_WEIGHT_FILES)}): {e}") from e
        problems = {k: v for k, v in info.items() if k in ("missing_keys", "unexpected_keys", "mismatched_keys") and v}
        if problems:
            raise RuntimeError(f"Qwen3 weights in {folder} do not match {config_path}: {problems}")
        return cls(model.eval(), tokenizer, **limits)

    def save_pretrained(self, folder: str | Path) -> None:
        """Write model (config.json + model.safetensors) and tokenizer files; ``from_pretrained`` reloads them."""
        self.model.save_pretrained(str(folder), safe_serialization=True)
        self.tokenizer.save_pretrained(str(folder))

    # ------------------------------------------------------------------ encoding
    @property
    def hidden_size(self) -> int:
        return int(self.model.config.hidden_size)

    def _tokenize(self, texts: list[str], max_tokens: int, what: str) -> tuple[torch.Tensor, torch.Tensor]:
        if isinstance(texts, str) or not isinstance(texts, (list, tuple)) or not texts:
            raise ValueError(f"{what}: expected a non-empty list of strings, got {type(texts).__name__}")
        for i, t in enumerate(texts):
            if not isinstance(t, str):
                raise ValueError(f"{what}: item {i} is {type(t).__name__}, expected str")
        # A first pass without truncation tells how long each text really is, so truncation is never silent.
        full = self.tokenizer(list(texts), truncation=False, padding=False)["input_ids"]
        for i, ids in enumerate(full):
            if not ids:
                raise ValueError(f"{what}: item {i} ({texts[i]!r}) produced no tokens")
            if len(ids) > max_tokens:
                warnings.warn(
                    f"{what} {i} has {len(ids)} tokens; truncated to {max_tokens} tokens "
                    f"(text starts {texts[i][:60]!r})",
                    stacklevel=3,
                )
        enc = self.tokenizer(
            list(texts),
            truncation=True,
            max_length=max_tokens,
            padding="longest",
            padding_side="right",
            return_tensors="pt",
        )
        device = self.model.embed_tokens.weight.device
        return enc["input_ids"].to(device), enc["attention_mask"].to(device).bool()

    @torch.no_grad()
    def encode_captions(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Full caption prompts → ``(last_hidden_state [B, L, E], mask [B, L] bool)``; padded positions are 0."""
        ids, mask = self._tokenize(texts, self.max_caption_tokens, "caption")
        hidden = self.model(input_ids=ids, attention_mask=mask.long()).last_hidden_state
        return hidden.masked_fill(~mask[..., None], 0.0), mask

    @torch.no_grad()
    def embed_lyrics(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Full lyric prompts → ``(embed_tokens(ids) [B, L, E], mask [B, L] bool)``; padded positions are 0."""
        ids, mask = self._tokenize(texts, self.max_lyric_tokens, "lyrics")
        embeds = self.model.embed_tokens(ids)
        return embeds.masked_fill(~mask[..., None], 0.0), mask
