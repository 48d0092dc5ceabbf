"""A caption or lyrics too long for the text encoder is reported naming the metadata row and the audio file, and
quoting the user's own text where it is cut, not the prompt template around it."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from acestep_train import load_model
from acestep_train.conditioning.text import encode_text_conditions
from acestep_train.models.text_encoder import TextEncoder
from acestep_train.models.tiny_tokenizer import TINY_QWEN3_CONFIG, build_tiny_tokenizer
from acestep_train.training.features import BundleEncoder
from datamodules.cache import build_cache
from datamodules.metadata import load_metadata

CAPTION = "warm analog pads " * 20 + "THE-END-OF-THE-CAPTION"  # 362 characters = 362 tiny tokens
LYRICS = "[verse]\n" + "la la la\n" * 60 + "LAST-LINE"


def _encode(te: TextEncoder, captions, lyrics, labels=None):
    b = len(captions)
    return encode_text_conditions(te, captions, lyrics, bpm=[None] * b, keyscale=[None] * b,
                                  timesignature=[None] * b, duration=[10] * b, vocal_language=["en"] * b,
                                  labels=labels)


@pytest.fixture
def tiny_te() -> TextEncoder:
    torch.manual_seed(0)
    return TextEncoder.from_config(TINY_QWEN3_CONFIG, build_tiny_tokenizer(), max_caption_tokens=256,
                                   max_lyric_tokens=300)


def test_warnings_quote_the_users_text_where_it_is_cut(tiny_te: TextEncoder) -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        conds = _encode(tiny_te, ["short", CAPTION], ["ok", LYRICS], labels=["meta.csv row 2 (a.wav)",
                                                                           "meta.csv row 3 (b.wav)"])
    messages = [str(w.message) for w in caught]
    assert len(messages) == 2, messages  # one per cut text; the encoder's template-quoting warning is replaced
    caption, lyrics = messages
    # The tiny tokenizer is one token per byte; the caption starts at character 85 of the prompt template.
    assert caption.startswith("meta.csv row 3 (b.wav): caption too long: its prompt has ")
    assert "the text encoder keeps 256; the caption is cut after 171 of its 362 characters: kept …" in caption
    assert "# Instruction" not in caption and "warm analog pads" in caption and "THE-END" not in caption
    assert lyrics.startswith("meta.csv row 3 (b.wav): lyrics too long: ") and "keeps 300" in lyrics
    assert "the lyrics are cut after 276 of its 557 characters" in lyrics  # "# Languages\nen\n\n# Lyric\n": 24
    assert "la la la" in lyrics and "# Lyric" not in lyrics and "LAST-LINE" not in lyrics
    assert conds.text_mask[1].sum() == 256 and conds.lyric_mask[1].sum() == 300


def test_a_caption_that_fits_but_pushes_out_the_metas_says_so(tiny_te: TextEncoder) -> None:
    caption = "x" * 150  # fits; the metas block after it does not
    with pytest.warns(UserWarning, match=r"^item 0: caption too long: .*; the caption itself fits \('x+'\), "
                                         r"but the metas after it are cut$"):
        _encode(tiny_te, [caption], ["ok"])


def test_texts_within_the_limit_warn_nothing(tiny_te: TextEncoder) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _encode(tiny_te, ["fine"], ["short lyrics"])


def test_the_cache_build_names_row_and_audio_file(tmp_path: Path) -> None:
    """Through the real preprocessing encoder (tiny bundle): the warning names the metadata row and the file."""
    data = tmp_path / "data"
    data.mkdir()
    t = np.arange(24000) / 48000
    sf.write(data / "song.wav", np.stack([0.3 * np.sin(2 * np.pi * 330 * t)] * 2, axis=1), 48000)
    (data / "m.csv").write_text(f'audio,prompt,lyrics\nsong.wav,short,ok\nsong.wav,"{CAPTION}",ok\n')
    bundle = load_model("tiny")
    bundle.text_encoder.max_caption_tokens = 256
    with pytest.warns(UserWarning) as caught:
        build_cache(load_metadata(data / "m.csv"), BundleEncoder(bundle), tmp_path / "cache", max_duration=None,
                    seed=0, progress=False)
    messages = [str(w.message) for w in caught if "too long" in str(w.message)]
    assert len(messages) == 1, messages
    assert messages[0].startswith(f"{data / 'm.csv'} row 3 ({data / 'song.wav'}): caption too long: ")
    assert "warm analog pads" in messages[0] and "# Instruction" not in messages[0]
