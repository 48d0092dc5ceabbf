"""Parse and normalise the musical metadata values (bpm, keyscale, time signature, language, duration).

Each parser takes the raw cell (str from CSV, any JSON scalar) and returns the normalised value, ``None`` when
the cell is empty, or raises ``ValueError`` with a short description of the problem; the caller adds the file
and row. The accepted sets follow the official ACE-Step constants (``acestep/constants.py``): BPM 30-300,
keys = 7 notes x {"", #, b} x {major, minor}, time signatures 2/3/4/6 (= 2/4, 3/4, 4/4, 6/8).
"""

from __future__ import annotations

import math
import re
from typing import Any

BPM_MIN, BPM_MAX = 30, 300
VALID_TIME_SIGNATURES = ("2", "3", "4", "6")
VALID_LANGUAGES = frozenset(
    "ar az bg bn ca cs da de el en es fa fi fr he hi hr ht hu id is it ja ko la lt ms ne nl no "
    "pa pl pt ro ru sa sk sr sv sw ta te th tl tr uk ur vi yue zh unknown".split()
)

# "N/A" is what the official pipeline writes for a missing meta value, so a user copying its output back in
# means "unknown", not a malformed value.
_MISSING = {"", "n/a"}

_KEY_RE = re.compile(
    r"""^\s*(?P<note>[A-Ga-g])\s*
    (?P<acc>\#|♯|♭|b|-?sharp|-?flat)?\s*[-_]?\s*
    (?P<mode>major|minor|maj|min|m)?\s*$""",
    re.IGNORECASE | re.VERBOSE,
)


def is_missing(value: Any) -> bool:
    if value is None:
        return True
    return isinstance(value, str) and value.strip().lower() in _MISSING


def _number(value: Any, what: str) -> float:
    # bool is an int subclass: JSON `true` must not become 1 BPM.
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ValueError(f"{what} {value!r} is not a number")
    try:
        number = float(value)
    except ValueError:
        raise ValueError(f"{what} {value!r} is not a number") from None
    if not math.isfinite(number):
        raise ValueError(f"{what} {value!r} is not a finite number")
    return number


def parse_bpm(value: Any) -> int | None:
    """BPM as an int in [30, 300]. Fractional values (beat trackers emit 123.05) round to the nearest integer,
    because the model's metas string only ever shows an integer BPM."""
    if is_missing(value):
        return None
    bpm = round(_number(value, "bpm"))
    if not BPM_MIN <= bpm <= BPM_MAX:
        raise ValueError(f"bpm {value!r} is outside {BPM_MIN}-{BPM_MAX}")
    return bpm


def parse_keyscale(value: Any) -> str | None:
    """Normalise a key to the official spelling "<Note><''|#|b> <major|minor>".

    Accepts case variations, Unicode accidentals, and short modes: "c major", "F#min", "B♭ major", "Am" all parse.
    A bare note ("C") is rejected rather than guessed as major.
    """
    if is_missing(value):
        return None
    if not isinstance(value, str):
        raise ValueError(f"keyscale {value!r} is not text like 'C major', 'F# minor', 'Bb major'")
    m = _KEY_RE.match(value)
    if m is None:
        raise ValueError(f"keyscale {value!r} does not parse; expected e.g. 'C major', 'F# minor', 'Bb major'")
    note = m["note"].upper()
    acc = (m["acc"] or "").lower().lstrip("-")
    acc = {"": "", "#": "#", "♯": "#", "sharp": "#", "b": "b", "♭": "b", "flat": "b"}[acc]
    mode = m["mode"]
    if mode is None:
        raise ValueError(f"keyscale {value!r} has no mode; write e.g. '{note}{acc} major' or '{note}{acc} minor'")
    mode = "minor" if mode.lower() in ("minor", "min", "m") else "major"
    return f"{note}{acc} {mode}"


def parse_timesignature(value: Any) -> str | None:
    """Time signature as the official beats-per-bar string "2", "3", "4" or "6".

    "4/4", "3/4", "6/8" style is accepted (the numerator is what the model sees); the denominator must be
    2, 4 or 8 so that something like "7/5" is not silently read as 7.
    """
    if is_missing(value):
        return None
    if isinstance(value, bool):
        raise ValueError(f"timesignature {value!r} is not a time signature")
    text = str(value).strip()
    num_text, slash, den_text = text.partition("/")
    try:
        num = _number(num_text.strip(), "timesignature")
        den = _number(den_text.strip(), "timesignature") if slash else 4.0
    except ValueError:
        raise ValueError(f"timesignature {value!r} does not parse; expected one of 2, 3, 4, 6 or e.g. '4/4'") from None
    if num != int(num) or den not in (2.0, 4.0, 8.0) or str(int(num)) not in VALID_TIME_SIGNATURES:
        raise ValueError(
            f"timesignature {value!r} is not supported; ACE-Step knows 2, 3, 4, 6 (2/4, 3/4, 4/4, 6/8)"
        )
    return str(int(num))


def parse_language(value: Any) -> str:
    """Vocal language code from the official list; missing means "unknown" (instrumental or unlabelled)."""
    if is_missing(value):
        return "unknown"
    code = str(value).strip().lower()
    if code not in VALID_LANGUAGES:
        codes = " ".join(sorted(VALID_LANGUAGES))
        raise ValueError(f"vocal_language {value!r} is not one of the ACE-Step language codes ({codes})")
    return code


def parse_duration(value: Any) -> float | None:
    """Duration in seconds (> 0), as stated by the metadata; the cache records the real (cropped) one."""
    if is_missing(value):
        return None
    duration = _number(value, "duration")
    if duration <= 0:
        raise ValueError(f"duration {value!r} must be > 0 seconds")
    return duration
