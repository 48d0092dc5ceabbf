"""TextEncoder, tiny tokenizer and the shared text conditioning.

References are computed independently: the model run on one unpadded sequence, ``embed_tokens.weight`` indexed
directly, and prompt strings written out literally.
"""

import json
import warnings

import pytest
import torch
from safetensors import safe_open
from tokenizers.processors import TemplateProcessing
from transformers import AutoTokenizer

from acestep_train.conditioning.text import TextConditions, build_caption_prompts, encode_text_conditions
from acestep_train.models.text_encoder import RELEASED_QWEN3_CONFIG, TextEncoder
from acestep_train.models.tiny_tokenizer import TINY_QWEN3_CONFIG, build_tiny_tokenizer
from manifest_helpers import ds_hash, load_manifest

# DiffSynth's recorded fingerprint of the real Qwen3-Embedding-0.6B/model.safetensors (checkpoints/README.md).
QWEN_MD5 = "3509bea17b0e8cffc3dd4a15cc7899d0"
EOT = 256  # tiny tokenizer id of <|endoftext|>


def byte_ids(text: str) -> list[int]:
    """What the tiny tokenizer must produce for text without special tokens: one id per UTF-8 byte."""
    return list(text.encode("utf-8"))


@pytest.fixture()
def tiny_te() -> TextEncoder:
    torch.manual_seed(0)
    return TextEncoder.from_config(TINY_QWEN3_CONFIG, build_tiny_tokenizer())


# ---------------------------------------------------------------------------- released layout
def test_manifest_md5_matches_diffsynth_record():
    assert ds_hash(load_manifest("qwen3-embedding-0.6b.keys.json")) == QWEN_MD5


def test_released_config_builds_exact_checkpoint_layout():
    manifest = load_manifest("qwen3-embedding-0.6b.keys.json")
    with torch.device("meta"):
        te = TextEncoder.from_config(RELEASED_QWEN3_CONFIG, build_tiny_tokenizer())
    ours = {k: list(v.shape) for k, v in te.model.state_dict().items()}
    assert ours == manifest
    assert ds_hash(ours) == QWEN_MD5


# ---------------------------------------------------------------------------- tiny tokenizer
def test_tiny_tokenizer_bytes_and_endoftext(tmp_path):
    tok = build_tiny_tokenizer()
    assert len(tok) == TINY_QWEN3_CONFIG["vocab_size"]
    text = "Héllo, wörld! 音楽 [verse]\n  tabs\t"
    assert tok(text)["input_ids"] == byte_ids(text)
    assert tok.decode(tok(text)["input_ids"]) == text
    ids = tok("a<|endoftext|>\n")["input_ids"]
    assert ids == [ord("a"), EOT, ord("\n")]
    assert tok.pad_token_id == tok.eos_token_id == EOT

    tok.save_pretrained(tmp_path / "tok")
    again = AutoTokenizer.from_pretrained(tmp_path / "tok")
    assert again(text + "<|endoftext|>")["input_ids"] == byte_ids(text) + [EOT]
    assert again.pad_token_id == EOT


# ---------------------------------------------------------------------------- encode_captions / embed_lyrics
def test_captions_match_unpadded_single_runs(tiny_te):
    texts = ["short", "a considerably longer caption<|endoftext|>\n", "mid length"]
    expected_ids = [
        byte_ids("short"),
        byte_ids("a considerably longer caption") + [EOT] + byte_ids("\n"),
        byte_ids("mid length"),
    ]
    # The released tokenizer may pad on the left; we must still pad right so results do not depend on batch-mates.
    tiny_te.tokenizer.padding_side = "left"
    hidden, mask = tiny_te.encode_captions(texts)
    longest = max(map(len, expected_ids))
    assert hidden.shape == (3, longest, 32) and mask.dtype == torch.bool
    for i, ids in enumerate(expected_ids):
        n = len(ids)
        assert mask[i].tolist() == [True] * n + [False] * (longest - n)
        with torch.no_grad():
            ref = tiny_te.model(input_ids=torch.tensor([ids])).last_hidden_state[0]
        torch.testing.assert_close(hidden[i, :n], ref, rtol=1e-5, atol=1e-5)
        assert torch.all(hidden[i, n:] == 0)


def test_lyrics_are_token_embeddings_only(tiny_te):
    texts = ["la la", "longer lyric line"]
    embeds, mask = tiny_te.embed_lyrics(texts)
    table = tiny_te.model.embed_tokens.weight
    for i, text in enumerate(texts):
        n = len(byte_ids(text))
        assert mask[i, :n].all() and not mask[i, n:].any()
        assert torch.equal(embeds[i, :n], table[torch.tensor(byte_ids(text))])
        assert torch.all(embeds[i, n:] == 0)


def test_special_tokens_are_whatever_the_tokenizer_adds(tiny_te):
    # Simulate the upstream Qwen3-Embedding post-processor that appends <|endoftext|> (docs/pipeline.md §10 q6):
    # nothing may strip it, and nothing may add one when the tokenizer does not.
    tok = tiny_te.tokenizer
    _, mask_plain = tiny_te.encode_captions(["ab<|endoftext|>\n"])
    assert mask_plain.sum().item() == 4
    tok.backend_tokenizer.post_processor = TemplateProcessing(
        single="$A <|endoftext|>", special_tokens=[("<|endoftext|>", EOT)]
    )
    hidden, mask = tiny_te.encode_captions(["ab<|endoftext|>\n"])
    assert mask.sum().item() == 5
    with torch.no_grad():
        ref = tiny_te.model(input_ids=torch.tensor([[97, 98, EOT, 10, EOT]])).last_hidden_state
    torch.testing.assert_close(hidden, ref, rtol=1e-5, atol=1e-5)
    embeds, lmask = tiny_te.embed_lyrics(["x"])
    assert lmask.sum().item() == 2
    assert torch.equal(embeds[0, 1], tiny_te.model.embed_tokens.weight[EOT])


def test_truncation_warns_with_token_counts(tiny_te):
    with pytest.warns(UserWarning, match="caption 1 has 300 tokens; truncated to 256"):
        hidden, mask = tiny_te.encode_captions(["ok", "x" * 300])
    assert hidden.shape[1] == 256 and mask[1].all()
    with pytest.warns(UserWarning, match="lyrics 0 has 2100 tokens; truncated to 2048"):
        embeds, _ = tiny_te.embed_lyrics(["y" * 2100])
    assert embeds.shape[1] == 2048
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # exactly at the limit: no warning
        tiny_te.encode_captions(["z" * 256])
        tiny_te.embed_lyrics(["z" * 2048])


def test_bad_inputs_raise(tiny_te):
    with pytest.raises(ValueError, match="non-empty list"):
        tiny_te.encode_captions("a string, not a list")
    with pytest.raises(ValueError, match="non-empty list"):
        tiny_te.embed_lyrics([])
    with pytest.raises(ValueError, match="item 1"):
        tiny_te.encode_captions(["a", None])
    with pytest.raises(ValueError, match="no tokens"):
        tiny_te.encode_captions(["a", ""])


# ---------------------------------------------------------------------------- save / load
def test_save_load_round_trip_bit_exact(tiny_te, tmp_path):
    folder = tmp_path / "te"
    tiny_te.save_pretrained(folder)
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        file_keys = set(f.keys())
    assert file_keys == set(tiny_te.model.state_dict())  # no "model." prefix, no lm_head
    assert "embed_tokens.weight" in file_keys
    loaded = TextEncoder.from_pretrained(folder)
    a, b = tiny_te.model.state_dict(), loaded.model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    texts = ["caption one<|endoftext|>\n", "two"]
    torch.testing.assert_close(loaded.encode_captions(texts), tiny_te.encode_captions(texts), rtol=0, atol=0)
    half = TextEncoder.from_pretrained(folder, dtype=torch.bfloat16)
    assert half.model.embed_tokens.weight.dtype == torch.bfloat16


def test_load_errors_name_the_path(tiny_te, tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(FileNotFoundError, match=str(missing)):
        TextEncoder.from_pretrained(missing)

    folder = tmp_path / "te"
    tiny_te.save_pretrained(folder)
    weights = folder / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(RuntimeError, match=str(folder)):
        TextEncoder.from_pretrained(folder)

    weights.unlink()
    with pytest.raises(FileNotFoundError, match=f"{folder}.*no weights"):
        TextEncoder.from_pretrained(folder)

    tiny_te.save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (folder / name).unlink()
    with pytest.raises(FileNotFoundError, match=f"{folder}.*no tokenizer"):
        TextEncoder.from_pretrained(folder)


# ---------------------------------------------------------------------------- shared conditioning
def test_encode_text_conditions_builds_the_documented_prompts(tiny_te):
    cond = encode_text_conditions(
        tiny_te,
        ["dreamy synth pop", "lofi"],
        ["[verse]\nhello", ""],
        bpm=[100, None],
        keyscale=["B minor", None],
        timesignature=["4", None],
        duration=[160.4, None],
        vocal_language=["en", "unknown"],
    )
    assert isinstance(cond, TextConditions)
    caption_0 = (
        "# Instruction\nFill the audio semantic mask based on the given conditions:\n\n"
        "# Caption\ndreamy synth pop\n\n"
        "# Metas\n- bpm: 100\n- timesignature: 4\n- keyscale: B minor\n- duration: 160 seconds\n<|endoftext|>\n"
    )
    caption_1 = (
        "# Instruction\nFill the audio semantic mask based on the given conditions:\n\n"
        "# Caption\nlofi\n\n"
        "# Metas\n- bpm: N/A\n- timesignature: N/A\n- keyscale: N/A\n- duration: 30 seconds\n<|endoftext|>\n"
    )
    lyric_0 = "# Languages\nen\n\n# Lyric\n[verse]\nhello<|endoftext|>"
    lyric_1 = "# Languages\nunknown\n\n# Lyric\n<|endoftext|>"
    hidden, mask = tiny_te.encode_captions([caption_0, caption_1])
    embeds, lmask = tiny_te.embed_lyrics([lyric_0, lyric_1])
    assert torch.equal(cond.text_mask, mask) and torch.equal(cond.lyric_mask, lmask)
    torch.testing.assert_close(cond.text_hidden, hidden, rtol=0, atol=0)
    torch.testing.assert_close(cond.lyric_embeds, embeds, rtol=0, atol=0)
    moved = cond.to("cpu", torch.bfloat16)
    assert moved.text_hidden.dtype == torch.bfloat16 and moved.text_mask.dtype == torch.bool


def test_conditioning_per_item_tasks_and_length_checks(tiny_te):
    prompts = build_caption_prompts(
        ["a", "b"], bpm=[None, None], keyscale=[None, None], timesignature=[None, None], duration=[10, 10],
        task=["text2music", "extract"], tracks=[None, "drums"],
    )
    assert prompts[1].startswith("# Instruction\nExtract the DRUMS track from the audio:\n")
    with pytest.raises(ValueError, match="bpm has 1 entries, expected one per caption \\(2\\)"):
        encode_text_conditions(
            tiny_te, ["a", "b"], ["", ""], bpm=[1], keyscale=[None] * 2, timesignature=[None] * 2,
            duration=[None] * 2, vocal_language=["en"] * 2,
        )
    with pytest.raises(ValueError, match="lyrics has 1 entries"):
        encode_text_conditions(
            tiny_te, ["a", "b"], [""], bpm=[None] * 2, keyscale=[None] * 2, timesignature=[None] * 2,
            duration=[None] * 2, vocal_language=["en"] * 2,
        )
