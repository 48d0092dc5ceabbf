"""What every command (train, preprocess, export, generate, submit) does with bad input: one ``error: ...`` line that
names the file, row or key, and exit status 2. A bug still shows its traceback.

    from acestep_train.cli import reported_errors

    def main():
        with reported_errors():
            ...            # parse, compose, run

``ACESTEP_TRACEBACK=1`` shows the full traceback of bad input too (for reporting a problem with a message).
Hydra's own error printing is switched off (``HYDRA_FULL_ERROR=1`` inside ``reported_errors``) so that a bad
override reaches the same handler instead of exiting 1 with Hydra's multi-line report.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator

EXIT_BAD_INPUT = 2
TRACEBACK_ENV = "ACESTEP_TRACEBACK"


class UsageError(ValueError):
    """A command-line value that cannot be used (the message says which and why)."""


class BadInputError(RuntimeError):
    """Base of the errors that higher layers (e.g. training's startup checks) raise for input that cannot work.

    Defined here so that this module never imports those layers: inference commands use it too.
    """


def bad_input_errors() -> tuple[type[BaseException], ...]:
    """The exception types that mean "this input cannot be used", not "this program has a bug"."""
    from hydra.errors import ConfigCompositionException, MissingConfigException, OverrideParseException
    from omegaconf.errors import ConfigKeyError, MissingMandatoryValue, ValidationError

    from datamodules.errors import DataError
    from acestep_train.checkpoints.checkpoint_io import CheckpointError
    from acestep_train.inference.offload import OffloadError
    from acestep_train.inference.request import RequestError
    from acestep_train.lora.inject import LoraError

    return (UsageError, BadInputError, DataError, CheckpointError, LoraError, RequestError, OffloadError,
            ConfigCompositionException, MissingConfigException, OverrideParseException, MissingMandatoryValue,
            ConfigKeyError, ValidationError, FileNotFoundError, NotADirectoryError, IsADirectoryError)


def bad_input_cause(err: BaseException, kinds: tuple[type[BaseException], ...]) -> BaseException | None:
    """``err`` or the exception it wraps (Hydra's InstantiationException, Lightning re-raises) if it is bad input."""
    seen = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, kinds):
            return err
        seen.add(id(err))
        err = err.__cause__
    return None


def one_line(err: BaseException) -> str:
    """The message on one line (OmegaConf/Hydra messages carry ``full_key: ...`` lines; keep them, joined)."""
    text = str(err).strip()
    if isinstance(err, (FileNotFoundError, NotADirectoryError, IsADirectoryError)) and err.filename:
        text = f"{err.filename}: {err.strerror or text}"
    parts = [line.strip() for line in text.splitlines() if line.strip()]
    return "; ".join(parts) or type(err).__name__


@contextlib.contextmanager
def reported_errors(extra: tuple[type[BaseException], ...] = ()) -> Iterator[None]:
    """Turn bad input raised inside the block into ``error: <message>`` on stderr and exit status 2.

    Args:
        extra: further exception types that count as bad input for this command.
    """
    os.environ.setdefault("HYDRA_FULL_ERROR", "1")  # let Hydra raise instead of printing and exiting 1
    try:
        yield
    except Exception as err:
        cause = bad_input_cause(err, bad_input_errors() + tuple(extra))
        if cause is None or os.environ.get(TRACEBACK_ENV, "") not in ("", "0"):
            raise
        print(f"error: {one_line(cause)}", file=sys.stderr, flush=True)
        sys.exit(EXIT_BAD_INPUT)
