"""``<|audio_code_N|>`` strings (``docs/pipeline.md`` §3.4): 5 Hz FSQ code indices, one per 5 latent frames."""

from __future__ import annotations

import re
import warnings

CODE_TOKEN = re.compile(r"<\|audio_code_(\d+)\|>")


def parse_audio_codes(text: str, codebook_size: int = 64000) -> list[int]:
    """Indices in ``text``. Values past the codebook are clamped with a warning (as upstream does).

    Unlike upstream (which silently ignores anything else), text that is not a code token is an error, and so is
    a string with no code at all: both mean the input is not what the caller thinks it is.
    """
    if not isinstance(text, str):
        raise ValueError(f"audio_code_string must be a str of <|audio_code_N|> tokens, got {type(text).__name__}")
    leftover = CODE_TOKEN.sub(" ", text).strip()
    if leftover:
        raise ValueError(f"audio_code_string is not parsable: {leftover[:40]!r} is not an <|audio_code_N|> token")
    codes = [int(m) for m in CODE_TOKEN.findall(text)]
    if not codes:
        raise ValueError("audio_code_string holds no <|audio_code_N|> token")
    top = codebook_size - 1
    if any(c > top for c in codes):
        warnings.warn(f"audio_code_string: {sum(c > top for c in codes)} codes exceed {top} and were clamped",
                      stacklevel=3)
        codes = [min(c, top) for c in codes]
    return codes


def format_audio_codes(indices) -> str:
    return "".join(f"<|audio_code_{int(i)}|>" for i in indices)
