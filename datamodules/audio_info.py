"""What an audio file holds, read from its header without decoding the samples.

The cache plans every crop from this (length, rate, channels), so only the window that will be used is ever
decoded. It also notices a truncated WAV/AIFF: libsndfile quietly reports the frames that are present, so a cut
download would otherwise train as a shorter song with no word. We read the container's own size field and
compare.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

import soundfile as sf

from datamodules.errors import AudioError

READABLE = (".wav", ".flac", ".aif", ".aiff", ".ogg", ".oga", ".opus", ".mp3")
# Containers libsndfile has no decoder for: fail with a clear message instead of libsndfile's
# "Format not recognised".
UNSUPPORTED = (".m4a", ".aac", ".mp4", ".wma", ".webm", ".mka", ".ac3", ".alac")
FLOAT_SUBTYPES = ("FLOAT", "DOUBLE")


@dataclass(frozen=True)
class AudioInfo:
    """Header facts about one file. ``frames`` is what can be read (after any truncation)."""

    path: Path
    frames: int
    samplerate: int
    channels: int
    subtype: str
    declared_frames: int | None = None  # set when the header promises more frames than the file holds

    @property
    def seconds(self) -> float:
        return self.frames / self.samplerate

    @property
    def is_float(self) -> bool:
        """Float samples can exceed full scale (integer PCM cannot)."""
        return self.subtype in FLOAT_SUBTYPES

    def truncation_note(self) -> str | None:
        """A sentence for the user if the file is cut short, else None."""
        if self.declared_frames is None:
            return None
        return (f"{self.path}: truncated: its header declares {self.declared_frames / self.samplerate:.3f} s "
                f"({self.declared_frames} frames) but the file holds only {self.seconds:.3f} s "
                f"({self.frames} frames); using the {self.seconds:.3f} s that are there")


def inspect_audio(path: str | Path) -> AudioInfo:
    """Read ``path``'s header. Raises ``AudioError`` naming the file if it is missing, unsupported or unreadable."""
    path = Path(path)
    check_path(path)
    try:
        info = sf.info(str(path))
    except (sf.LibsndfileError, RuntimeError) as e:
        raise decode_error(path, e) from e
    declared = None
    if info.format in ("WAV", "WAVEX", "AIFF"):
        declared = _declared_frames(path, info.format, info.frames)
    return AudioInfo(path, int(info.frames), int(info.samplerate), int(info.channels), info.subtype, declared)


def check_path(path: Path) -> None:
    if not path.is_file():
        raise AudioError(f"{path}: audio file not found")
    if path.suffix.lower() in UNSUPPORTED:
        raise AudioError(
            f"{path}: unsupported audio format {path.suffix!r}; libsndfile reads {', '.join(READABLE)} "
            f"(convert with e.g. ffmpeg -i in{path.suffix} out.flac)"
        )


def decode_error(path: Path, e: Exception) -> AudioError:
    if path.suffix.lower() not in READABLE:
        return AudioError(f"{path}: unsupported audio format {path.suffix!r} ({e}); readable: {', '.join(READABLE)}")
    return AudioError(f"{path}: cannot decode audio ({e})")


def _declared_frames(path: Path, container: str, readable: int) -> int | None:
    """Frames the sample-data chunk's size field promises, if that is more than libsndfile can read."""
    try:
        with path.open("rb") as f:
            head = f.read(12)
            found = _find_data_chunk(f, head, container)
    except OSError:
        return None
    if found is None:
        return None
    size, bytes_per_frame = found
    # 0 and 0xFFFFFFFF are what streaming writers leave when they cannot seek back: "size unknown", not a cut.
    if size in (0, 0xFFFFFFFF) or bytes_per_frame <= 0:
        return None
    declared = size // bytes_per_frame
    return declared if declared > readable else None


def _find_data_chunk(f, head: bytes, container: str) -> tuple[int, int] | None:
    """(data size in bytes, bytes per frame) from a RIFF/WAVE or FORM/AIFF file; None if not found."""
    little = container != "AIFF"
    if little and not (head[:4] == b"RIFF" and head[8:12] == b"WAVE"):
        return None
    if not little and not (head[:4] == b"FORM" and head[8:12] in (b"AIFF", b"AIFC")):
        return None
    order = "<" if little else ">"
    bytes_per_frame = 0
    while True:
        chunk = f.read(8)
        if len(chunk) < 8:
            return None
        cid, size = chunk[:4], struct.unpack(f"{order}I", chunk[4:])[0]
        if little and cid == b"fmt ":
            fmt = f.read(min(size, 16))
            bytes_per_frame = struct.unpack("<H", fmt[12:14])[0] if len(fmt) >= 14 else 0
            f.seek(size - len(fmt) + (size & 1), 1)
        elif not little and cid == b"COMM":
            comm = f.read(min(size, 8))
            if len(comm) >= 8:
                channels, _, bits = struct.unpack(">hIh", comm)
                bytes_per_frame = channels * ((bits + 7) // 8)
            f.seek(size - len(comm) + (size & 1), 1)
        elif cid == (b"data" if little else b"SSND"):
            # SSND starts with 8 bytes of offset/block size before the samples.
            return (size if little else size - 8), bytes_per_frame
        else:
            f.seek(size + (size & 1), 1)  # chunks are padded to even sizes
