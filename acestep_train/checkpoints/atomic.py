"""Atomic file writes: a reader (or a resumed run after a crash) sees the old file or the new one, never half of one.

One helper for every writer, so all of them get the same three properties:

- the data goes to a temporary file in the target's folder (same filesystem, so the final rename is atomic);
- the temporary file is created with mode ``0o666`` filtered by the process umask, exactly like ``open(path, "w")``
  (``tempfile.mkstemp`` and some libraries create ``0o600`` files, which teammates on shared storage cannot read);
- the file is fsynced before the rename and the folder after it, so a power loss cannot leave a renamed but empty
  file behind.

    with atomic_write(path, "wb") as f:      # a file object: torch.save(obj, f), json.dump(obj, f), ...
        torch.save(obj, f)
    with atomic_path(path) as tmp:           # a path, for libraries that only write by name (safetensors, soundfile)
        save_file(tensors, str(tmp))
"""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import IO

_FILE_MODE = 0o666  # what open() asks for; the kernel applies the umask to it


def _temp_name(path: Path, suffix: str = "") -> Path:
    # Hidden, unique per writer (pid + random), and in the same folder as the target.
    return path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp{suffix}")


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # some filesystems do not let a folder be opened; the rename is still atomic there
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def umask_mode() -> int:
    """The mode a plain ``open(path, "w")`` gives a new file under the current umask."""
    status = Path("/proc/self/status")
    with contextlib.suppress(OSError):
        for line in status.read_text().splitlines():
            if line.startswith("Umask:"):
                return _FILE_MODE & ~int(line.split()[1], 8)
    mask = os.umask(0o022)  # not thread-safe, hence only the fallback where /proc does not say
    os.umask(mask)
    return _FILE_MODE & ~mask


def _commit(tmp: Path, path: Path) -> None:
    os.chmod(tmp, umask_mode())  # the writer may have created it 0o600 (safetensors does)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success it replaces ``path`` (umask mode, fsynced).

    ``suffix`` is appended to the temporary name for writers that pick the format from it (``.wav``). On an
    exception the temporary file is removed and ``path`` is left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_name(path, suffix)
    try:
        yield tmp
        _commit(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb", encoding: str | None = None) -> Iterator[IO]:
    """Yield a file object writing to a temporary file next to ``path``; on success it replaces ``path``.

    The data streams straight to disk (no second in-memory copy of what is written). ``mode`` is ``"wb"`` or
    ``"w"`` (text; ``encoding`` defaults to UTF-8).
    """
    if mode not in ("wb", "w"):
        raise ValueError(f"atomic_write mode={mode!r}: use 'wb' or 'w'")
    with atomic_path(path) as tmp:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, _FILE_MODE)
        binary = mode == "wb"
        with open(fd, mode, encoding=None if binary else (encoding or "utf-8")) as f:
            yield f
            f.flush()


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """``Path.write_text``, atomically."""
    with atomic_write(path, "w") as f:
        f.write(text)
    return Path(path)
