"""An offline byte-level tokenizer and matching tiny Qwen3 config, for tests and the tiny model.

Every UTF-8 byte is one token (256 tokens, no merges), plus ``<|endoftext|>`` as a single special token used
as pad and eos, so the literal ``<|endoftext|>`` in the prompt templates (``docs/pipeline.md`` §4.2) is one token,
as it is for the real Qwen3 tokenizer. Built from scratch with ``tokenizers``: nothing is downloaded.
"""

from __future__ import annotations

from typing import Any

from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

END_OF_TEXT = "<|endoftext|>"
TINY_VOCAB_SIZE = 257  # 256 bytes + <|endoftext|>
TINY_EOS_ID = 256

# Small Qwen3Model for CPU tests. head_dim * heads (32) equals hidden here; the released model has 2048 > 1024.
TINY_QWEN3_CONFIG: dict[str, Any] = {
    "vocab_size": TINY_VOCAB_SIZE,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "head_dim": 16,
    "hidden_act": "silu",
    "max_position_embeddings": 32768,
    "rms_norm_eps": 1e-6,
    "rope_theta": 1_000_000.0,
    "attention_bias": False,
    "attention_dropout": 0.0,
    "tie_word_embeddings": True,
    "use_sliding_window": False,
    "bos_token_id": TINY_EOS_ID,
    "eos_token_id": TINY_EOS_ID,
    "pad_token_id": TINY_EOS_ID,
}


def build_tiny_tokenizer() -> PreTrainedTokenizerFast:
    """Byte-level tokenizer: ids 0..255 are the GPT-2 byte alphabet, id 256 is ``<|endoftext|>``."""
    # BPE with an empty merge list = one token per (byte-level-mapped) byte.
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    # Order by the byte each printable char stands for, so that token id == byte value (easy to reason about).
    byte_to_char = _bytes_to_unicode()
    vocab = {byte_to_char[b]: b for b in range(256)}
    if set(vocab) != set(alphabet):
        raise RuntimeError("byte-level alphabet of the installed tokenizers library is not the expected 256 chars")
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    # use_regex=False: no word splitting is needed when there are no merges; add_prefix_space=False keeps text as is.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([END_OF_TEXT])
    if tok.token_to_id(END_OF_TEXT) != TINY_EOS_ID or tok.get_vocab_size() != TINY_VOCAB_SIZE:
        raise RuntimeError("tiny tokenizer layout changed: <|endoftext|> must be id 256 in a vocab of 257")
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=END_OF_TEXT,
        pad_token=END_OF_TEXT,
        padding_side="right",
        model_max_length=32768,
    )


def _bytes_to_unicode() -> dict[int, str]:
    """The GPT-2 byte → printable-char table used by byte-level BPE (public, well-known mapping)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table
