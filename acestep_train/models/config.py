"""Architecture hyper-parameters of an ACE-Step 1.5 checkpoint (the fields of its ``config.json``)."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class AceStepConfig:
    """Architecture of the DiT, condition encoder and audio (de)tokenizer.

    Defaults are the released 2B values (``docs/architecture.md`` §2.2). XL overrides the DiT width/depth and sets
    the ``encoder_*`` fields so that the encoder, tokenizer and detokenizer stay 2048 wide.
    """

    hidden_size: int = 2048
    intermediate_size: int = 6144
    num_hidden_layers: int = 24
    num_attention_heads: int = 16
    num_key_value_heads: int = 8
    head_dim: int = 128
    encoder_hidden_size: int | None = None
    encoder_intermediate_size: int | None = None
    encoder_num_attention_heads: int | None = None
    encoder_num_key_value_heads: int | None = None
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1_000_000.0
    max_position_embeddings: int = 32768
    attention_bias: bool = False
    attention_dropout: float = 0.0
    use_sliding_window: bool = True
    sliding_window: int | None = 128
    layer_types: list[str] | None = None
    in_channels: int = 192
    patch_size: int = 2
    audio_acoustic_hidden_dim: int = 64
    text_hidden_dim: int = 1024
    timbre_hidden_dim: int = 64
    timbre_fix_frame: int = 750
    num_lyric_encoder_hidden_layers: int = 8
    num_timbre_encoder_hidden_layers: int = 4
    num_attention_pooler_hidden_layers: int = 2
    pool_window_size: int = 5
    fsq_dim: int = 2048
    fsq_input_levels: list[int] = field(default_factory=lambda: [8, 8, 8, 5, 5, 5])
    fsq_input_num_quantizers: int = 1
    is_turbo: bool = True
    model_version: str = "turbo"
    timestep_mu: float = -0.4
    timestep_sigma: float = 1.0
    # Keys of a config.json that this class does not model (vocab_size, use_cache, …), kept so that an
    # exported config.json round-trips.
    extra: dict[str, Any] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if not self.use_sliding_window:
            self.sliding_window = None
        n = max(self.num_hidden_layers, self.num_lyric_encoder_hidden_layers, self.num_timbre_encoder_hidden_layers,
                self.num_attention_pooler_hidden_layers)
        if self.layer_types is None:
            # Even layer index = sliding window, odd = full attention (official default rule).
            self.layer_types = ["sliding_attention" if (i + 1) % 2 else "full_attention" for i in range(n)]
        else:
            self.layer_types = list(self.layer_types)
            bad = sorted(set(self.layer_types) - {"sliding_attention", "full_attention"})
            if bad:
                raise ValueError(f"layer_types holds unknown attention kinds {bad}")
            if len(self.layer_types) < n:
                raise ValueError(f"layer_types has {len(self.layer_types)} entries but {n} layers need one each")
        self.fsq_input_levels = list(self.fsq_input_levels)
        if self.in_channels != 3 * self.audio_acoustic_hidden_dim:
            raise ValueError(
                f"in_channels={self.in_channels} must be 3 x audio_acoustic_hidden_dim="
                f"{self.audio_acoustic_hidden_dim} (source latents | chunk mask | noisy latents)")

    @property
    def encoder_width(self) -> int:
        """Width of the condition encoder, tokenizer and detokenizer (2048 in 2B and XL)."""
        return self.encoder_hidden_size or self.hidden_size

    def encoder_block_kwargs(self) -> dict[str, Any]:
        """Sizes of the encoder-width transformer blocks (lyric/timbre encoder, pooler, detokenizer)."""
        wide = self.encoder_hidden_size is not None and self.encoder_hidden_size != self.hidden_size
        return dict(
            hidden_size=self.encoder_width,
            intermediate_size=self.encoder_intermediate_size if wide else self.intermediate_size,
            num_attention_heads=self.encoder_num_attention_heads if wide else self.num_attention_heads,
            num_key_value_heads=self.encoder_num_key_value_heads if wide else self.num_key_value_heads,
        )

    # ---- config.json I/O -------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "AceStepConfig":
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        known = {k: v for k, v in d.items() if k in names}
        extra = {k: v for k, v in d.items() if k not in names and k != "extra"}
        extra.update(d.get("extra") or {})
        return cls(**known, extra=extra)

    @classmethod
    def from_json(cls, path: str | Path) -> "AceStepConfig":
        path = Path(path)
        try:
            d = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from None
        if not isinstance(d, dict):
            raise ValueError(f"{path}: expected a JSON object, found {type(d).__name__}")
        return cls.from_dict(d)

    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "extra"}
        d.update(self.extra)
        d.setdefault("model_type", "acestep")
        d.setdefault("architectures", ["AceStepConditionGenerationModel"])
        return d
