"""Prompt templates against the exact strings of docs/pipeline.md §4.2–4.4 (written out literally here)."""

import math

import numpy as np
import pytest

from acestep_train.conditioning.prompts import (
    LYRIC_GEN_PROMPT,
    SFT_GEN_PROMPT,
    TASK_INSTRUCTIONS,
    TRACK_NAMES,
    caption_prompt,
    format_metas,
    lyric_prompt,
    task_instruction,
)

# docs/pipeline.md §4.4 example (DiffSynth defaults, duration 160), verbatim.
DOC_EXAMPLE = """# Instruction
Fill the audio semantic mask based on the given conditions:

# Caption
<prompt>

# Metas
- bpm: 100
- timesignature: 4
- keyscale: B minor
- duration: 160 seconds
<|endoftext|>
"""


def test_template_constants_are_exact():
    assert SFT_GEN_PROMPT == "# Instruction\n{}\n\n# Caption\n{}\n\n# Metas\n{}<|endoftext|>\n"
    assert LYRIC_GEN_PROMPT == "# Languages\n{}\n\n# Lyric\n{}<|endoftext|>"


def test_doc_example_reproduced():
    metas = format_metas(bpm=100, timesignature="4", keyscale="B minor", duration=160)
    assert caption_prompt("<prompt>", metas) == DOC_EXAMPLE


def test_metas_missing_values_are_na_and_duration_defaults_to_30():
    assert format_metas() == "- bpm: N/A\n- timesignature: N/A\n- keyscale: N/A\n- duration: 30 seconds\n"
    # Empty strings and NaN (how tabular data says "missing") are also N/A, not "" or "nan".
    assert format_metas(bpm=math.nan, keyscale="", timesignature="  ") == format_metas()


def test_metas_partial_and_duration_truncates_to_int():
    assert format_metas(bpm=128, duration=59.9) == (
        "- bpm: 128\n- timesignature: N/A\n- keyscale: N/A\n- duration: 59 seconds\n"
    )
    assert format_metas(keyscale="F# minor", timesignature=3, duration=600) == (
        "- bpm: N/A\n- timesignature: 3\n- keyscale: F# minor\n- duration: 600 seconds\n"
    )
    # numpy scalars (dataset columns) behave like Python numbers.
    assert format_metas(bpm=np.int64(90), duration=np.float32(12.9)) == format_metas(bpm=90, duration=12)
    assert format_metas(bpm=np.float64("nan")) == format_metas()


@pytest.mark.parametrize("bad", [0, -3, math.nan, math.inf, "30", True])
def test_metas_rejects_bad_duration(bad):
    with pytest.raises(ValueError, match="duration"):
        format_metas(duration=bad)


def test_metas_rejects_non_scalar_values():
    with pytest.raises(ValueError, match="bpm"):
        format_metas(bpm=[120])


def test_lyric_prompt_exact():
    assert lyric_prompt("[verse]\nhello", "en") == "# Languages\nen\n\n# Lyric\n[verse]\nhello<|endoftext|>"
    assert lyric_prompt("") == "# Languages\nunknown\n\n# Lyric\n<|endoftext|>"
    with pytest.raises(ValueError, match="language"):
        lyric_prompt("x", "")


def test_instructions_exact():
    expected = {
        "text2music": "Fill the audio semantic mask based on the given conditions:",
        "cover": "Generate audio semantic tokens based on the given conditions:",
        "repaint": "Repaint the mask area based on the given conditions:",
        "extract": "Extract the track from the audio:",
        "lego": "Generate the track based on the audio context:",
        "complete": "Complete the input track:",
    }
    for task, text in expected.items():
        assert task_instruction(task) == text
    assert task_instruction("extract", "vocals") == "Extract the VOCALS track from the audio:"
    assert task_instruction("lego", ["backing_vocals"]) == (
        "Generate the BACKING_VOCALS track based on the audio context:"
    )
    assert task_instruction("complete", ["drums", "bass"]) == "Complete the input track with DRUMS | BASS:"
    assert TASK_INSTRUCTIONS["extract"] == "Extract the {TRACK_NAME} track from the audio:"


def test_track_names_exact():
    assert set(TRACK_NAMES) == {
        "woodwinds", "brass", "fx", "synth", "strings", "percussion",
        "keyboard", "guitar", "bass", "drums", "backing_vocals", "vocals",
    }


def test_caption_prompt_with_task_and_tracks():
    out = caption_prompt("rock", format_metas(), task="extract", tracks="guitar")
    assert out.startswith("# Instruction\nExtract the GUITAR track from the audio:\n\n# Caption\nrock\n\n# Metas\n")
    # Braces in user text must survive (no second format pass).
    assert "{weird}" in caption_prompt("a {weird} caption", format_metas())


def test_invalid_tasks_and_tracks():
    with pytest.raises(ValueError, match="text2music.*cover.*repaint"):
        caption_prompt("x", format_metas(), task="txt2music")
    with pytest.raises(ValueError, match="valid: woodwinds"):
        task_instruction("extract", "kazoo")
    with pytest.raises(ValueError, match="takes no track"):
        task_instruction("text2music", "vocals")
    with pytest.raises(ValueError, match="exactly one"):
        task_instruction("extract", ["vocals", "drums"])
    with pytest.raises(ValueError, match="caption"):
        caption_prompt(None, format_metas())
