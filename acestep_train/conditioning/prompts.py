"""Exact ACE-Step 1.5 text templates (``docs/pipeline.md`` §4.2–4.4): caption prompt, metas string, lyric prompt and
task instructions. Identical in the official pipeline and DiffSynth; ``<|endoftext|>`` is literal template text.
Missing metas render as ``N/A`` (official behaviour; DiffSynth prints ``None``).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

SFT_GEN_PROMPT = "# Instruction\n{}\n\n# Caption\n{}\n\n# Metas\n{}<|endoftext|>\n"
LYRIC_GEN_PROMPT = "# Languages\n{}\n\n# Lyric\n{}<|endoftext|>"

# Official TASK_INSTRUCTIONS (= DiffSynth INSTRUCTION_MAP). {TRACK_NAME} / {TRACK_CLASSES} are filled by
# task_instruction(); the *_default entries are used when no track is named.
TASK_INSTRUCTIONS: dict[str, str] = {
    "text2music": "Fill the audio semantic mask based on the given conditions:",
    "cover": "Generate audio semantic tokens based on the given conditions:",
    "repaint": "Repaint the mask area based on the given conditions:",
    "extract": "Extract the {TRACK_NAME} track from the audio:",
    "extract_default": "Extract the track from the audio:",
    "lego": "Generate the {TRACK_NAME} track based on the audio context:",
    "lego_default": "Generate the track based on the audio context:",
    "complete": "Complete the input track with {TRACK_CLASSES}:",
    "complete_default": "Complete the input track:",
}

TASKS: tuple[str, ...] = ("text2music", "cover", "repaint", "extract", "lego", "complete")
_SINGLE_TRACK_TASKS = ("extract", "lego")

TRACK_NAMES: tuple[str, ...] = (
    "woodwinds", "brass", "fx", "synth", "strings", "percussion",
    "keyboard", "guitar", "bass", "drums", "backing_vocals", "vocals",
)

# The metas string states 30 s when no duration is known (the official default meta); not a generation length.
METAS_DURATION_WHEN_UNKNOWN_S = 30
NA = "N/A"


def _check_track(name: object) -> str:
    if not isinstance(name, str) or name.lower() not in TRACK_NAMES:
        raise ValueError(f"unknown track name {name!r}; valid: {', '.join(TRACK_NAMES)}")
    return name.upper()


def task_instruction(task: str = "text2music", tracks: str | Sequence[str] | None = None) -> str:
    """The instruction line for ``task``. ``extract``/``lego`` take one track name, ``complete`` one or more
    (joined ``" | "``), all upper-cased; without ``tracks`` those tasks use their ``*_default`` instruction."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; valid tasks: {', '.join(TASKS)}")
    if isinstance(tracks, str):
        tracks = [tracks]
    if tracks is not None and len(tracks) == 0:
        tracks = None
    if task not in _SINGLE_TRACK_TASKS + ("complete",):
        if tracks is not None:
            raise ValueError(f"task {task!r} takes no track names, got {list(tracks)}")
        return TASK_INSTRUCTIONS[task]
    if tracks is None:
        return TASK_INSTRUCTIONS[f"{task}_default"]
    names = [_check_track(t) for t in tracks]
    if task in _SINGLE_TRACK_TASKS:
        if len(names) != 1:
            raise ValueError(f"task {task!r} takes exactly one track name, got {list(tracks)}")
        return TASK_INSTRUCTIONS[task].replace("{TRACK_NAME}", names[0])
    return TASK_INSTRUCTIONS[task].replace("{TRACK_CLASSES}", " | ".join(names))


def _meta_value(name: str, value: object) -> str:
    # NaN is how tabular loaders (pandas) spell "missing"; treat it like None rather than printing "nan".
    if value is None or (isinstance(value, str) and not value.strip()):
        return NA
    # numbers.Real also admits numpy scalars, which is what dataset columns hold.
    if isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isnan(value):
        return NA
    if isinstance(value, bool) or not isinstance(value, (str, numbers.Real)):
        raise ValueError(f"metas: {name} must be a str or number (or None for N/A), got {type(value).__name__}")
    return str(value)


def format_metas(bpm=None, timesignature=None, keyscale=None, duration=None) -> str:
    """The exact metas block, e.g.
    ``"- bpm: 100\\n- timesignature: 4\\n- keyscale: B minor\\n- duration: 160 seconds\\n"``.

    Missing (None / empty / NaN) bpm, timesignature, keyscale render as ``N/A``; values are printed with ``str()``
    as given (so ``120`` and ``120.0`` differ: pass what the data holds, consistently). ``duration`` is in
    seconds, rendered ``f"{int(duration)} seconds"``, default 30 (official ``_create_default_meta``).
    """
    if duration is None:
        duration = METAS_DURATION_WHEN_UNKNOWN_S
    if isinstance(duration, bool) or not isinstance(duration, numbers.Real) or not 0 < duration < math.inf:
        raise ValueError(f"metas: duration must be a positive number of seconds, got {duration!r}")
    return (
        f"- bpm: {_meta_value('bpm', bpm)}\n"
        f"- timesignature: {_meta_value('timesignature', timesignature)}\n"
        f"- keyscale: {_meta_value('keyscale', keyscale)}\n"
        f"- duration: {int(duration)} seconds\n"
    )


def caption_prompt(
    caption: str, metas: str, task: str = "text2music", tracks: str | Sequence[str] | None = None
) -> str:
    """``SFT_GEN_PROMPT`` filled with the task instruction, the caption and a ``format_metas`` string."""
    if not isinstance(caption, str):
        raise ValueError(f"caption must be a str, got {type(caption).__name__}")
    if not isinstance(metas, str):
        raise ValueError(f"metas must be the str from format_metas(), got {type(metas).__name__}")
    return SFT_GEN_PROMPT.format(task_instruction(task, tracks), caption, metas)


def lyric_prompt(lyrics: str, language: str = "unknown") -> str:
    """``LYRIC_GEN_PROMPT`` filled with the vocal language (``"unknown"`` when not known) and the lyrics."""
    if not isinstance(lyrics, str):
        raise ValueError(f"lyrics must be a str, got {type(lyrics).__name__}")
    if not isinstance(language, str) or not language.strip():
        raise ValueError(f"language must be a non-empty str (use 'unknown'), got {language!r}")
    return LYRIC_GEN_PROMPT.format(language, lyrics)
