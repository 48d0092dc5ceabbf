"""Data errors and the skip/raise policy shared by metadata loading and cache building.

Every bad-input message names where the problem is (metadata file and row, or audio file) so a user can fix
the input without a debugger. The policy decides whether a bad row stops the run ("raise") or is reported and
left out ("skip"); in both cases nothing is dropped without a message.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

log = logging.getLogger("datamodules")

ON_ERROR_CHOICES = ("skip", "raise")


class DataError(ValueError):
    """Bad input data (a metadata row, an audio file). The message names the file and row."""


class MetadataError(DataError):
    """A metadata file or one of its rows is invalid."""


class AudioError(DataError):
    """An audio file cannot be used (unreadable, unsupported, empty, non-finite)."""


def check_on_error(on_error: str) -> str:
    if on_error not in ON_ERROR_CHOICES:
        raise ValueError(f"on_error must be one of {ON_ERROR_CHOICES}, got {on_error!r}")
    return on_error


@dataclass
class Problems:
    """Collects per-row problems under a skip/raise policy and ends with a one-line summary.

    Each problem is logged exactly once, where it is found, naming the row and the file; the summary only
    counts them (so a long warning scroll still ends with the totals, without repeating every message).

    Args:
        source: what is being processed, for the summary line (e.g. ``"metadata.csv"``).
        on_error: ``"raise"`` raises ``error_cls`` on the first problem; ``"skip"`` logs each problem as a warning.
            Warnings (``warn``: the item is kept) never raise.
        error_cls: the exception type raised under ``"raise"``.
        verbose: log warnings (False on ranks that would only repeat rank 0's messages).
    """

    source: str
    on_error: str = "skip"
    error_cls: type[DataError] = DataError
    verbose: bool = True
    skipped: list[str] = field(default_factory=list)
    warned: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        check_on_error(self.on_error)

    def report(self, where: str, problem: str, cause: BaseException | None = None) -> None:
        """Record that the item at ``where`` (e.g. ``"metadata.csv row 4"``) is bad because of ``problem``."""
        message = f"{where}: {problem}"
        if self.on_error == "raise":
            raise self.error_cls(message) from cause
        if self.verbose:
            log.warning("skipping %s", message)
        self.skipped.append(message)

    def warn(self, where: str, problem: str) -> None:
        """Record that the item at ``where`` is used despite ``problem`` (which should say what was done)."""
        message = f"{where}: {problem}"
        if self.verbose:
            log.warning("%s", message)
        self.warned.append(message)

    def summarize(self, total: int, what: str = "rows") -> None:
        """Log "skipped k of n rows" once, so a long warning scroll still ends with the count."""
        if not (self.skipped or self.warned) or not self.verbose:
            return
        log.warning("%s: skipped %d of %d %s, kept %d with warnings (each reported above)",
                    self.source, len(self.skipped), total, what, len(self.warned))
