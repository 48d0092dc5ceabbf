"""Read a dataset's metadata (CSV, JSON list, JSONL) into validated ``Record``s.

The default column names are DiffSynth-Studio's (``audio, prompt, lyrics, bpm, keyscale, timesignature,
vocal_language``, optional ``duration``), so its example ``metadata.json`` loads unchanged; other layouts map
their columns with ``fields={"prompt": "caption", "audio": "file"}``.

Row numbers are 1-based and are what a user sees when opening the file:
  - CSV: the line the record starts on; the header is row 1, so the first data row is row 2 (this equals the
    spreadsheet row unless an earlier cell spans several lines, e.g. multi-line lyrics);
  - JSONL: the line number;
  - JSON: the position of the object in the top-level list.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from datamodules.errors import MetadataError, Problems, check_on_error, log
from datamodules.values import (
    is_missing,
    parse_bpm,
    parse_duration,
    parse_keyscale,
    parse_language,
    parse_timesignature,
)

FIELDS = ("id", "audio", "prompt", "lyrics", "bpm", "keyscale", "timesignature", "vocal_language", "duration")
REQUIRED_FIELDS = ("audio", "prompt")
FORMATS = (".csv", ".json", ".jsonl")

# Column names other trainers use for our fields. Only used to suggest a `fields=` mapping in error messages:
# guessing silently is how ostris/ai-toolkit #874 ended up training on garbled metas.
_ALIASES = {
    "audio": ("file", "filename", "audio_path", "path", "audio_file"),
    "prompt": ("caption", "tags", "description", "text"),
    "keyscale": ("key", "key_scale", "scale"),
    "timesignature": ("time_signature", "time_sig", "timesig"),
    "vocal_language": ("language", "lang"),
    "bpm": ("tempo",),
    "lyrics": ("lyric",),
}


@dataclass(frozen=True)
class Record:
    """One validated metadata row (one copy of it when ``repeat > 1``)."""

    id: str  # the row's `id` column if it has one, else "<metadata file name>:<row>"
    row: int  # 1-based, see the module docstring
    audio: Path  # absolute path to an existing file
    prompt: str  # caption, exactly as written (never rewritten)
    lyrics: str = ""
    bpm: int | None = None
    keyscale: str | None = None  # normalised, e.g. "F# minor"
    timesignature: str | None = None  # "2", "3", "4" or "6"
    vocal_language: str = "unknown"
    duration: float | None = None  # seconds: as stated by the metadata; the cache passes the real crop length
    source: Path | None = None  # the metadata file this row came from
    repeat: int = 0  # which copy (0 .. repeat-1)

    @property
    def where(self) -> str:
        """ "metadata.csv row 12", for error messages."""
        return f"{self.source if self.source is not None else '<records>'} row {self.row}"


def load_metadata(
    path: str | Path,
    *,
    base_path: str | Path | None = None,
    fields: Mapping[str, str] | None = None,
    repeat: int = 1,
    on_error: str = "skip",
) -> list[Record]:
    """Read and validate a metadata file.

    Args:
        path: ``.csv`` (with a header row), ``.json`` (a list of objects) or ``.jsonl`` (one object per line).
        base_path: directory that relative audio paths resolve against; default: the metadata file's directory.
        fields: ``{our field: column name}`` for columns not named like ours (see ``FIELDS``).
        repeat: each row is returned ``repeat`` times (rows 1..n, then 1..n again, ...), with ``Record.repeat``
            telling the copies apart so the cache can give long files a different crop per copy.
        on_error: ``"skip"`` warns for every bad row and ends with a summary; ``"raise"`` stops at the first.
            Optional metas that do not parse (bpm, keyscale, timesignature, vocal_language, duration) do not
            make a row bad under either policy: the row is kept with those values unknown and a warning.

    Returns:
        The valid records in file order, repeated. Raises ``MetadataError`` if none is valid.
    """
    path = Path(path)
    check_on_error(on_error)
    if isinstance(repeat, bool) or not isinstance(repeat, int) or repeat < 1:
        raise ValueError(f"repeat must be an integer >= 1, got {repeat!r}")
    columns = _column_map(fields)
    base = Path(base_path) if base_path is not None else path.parent
    rows, seen_columns = _read(path)
    _check_columns(path, columns, seen_columns)

    problems = Problems(str(path), on_error, MetadataError)
    records = []
    for row, data in rows:
        where = f"{path} row {row}"
        if isinstance(data, Exception):
            problems.report(where, str(data))
            continue
        record = _to_record(data, row, path, base, columns, problems, where)
        if record is not None:
            records.append(record)
    problems.summarize(len(rows))
    if not records:
        raise MetadataError(f"{path}: no usable rows (of {len(rows)}); see the messages above")
    return [replace(r, repeat=k) for k in range(repeat) for r in records]


def _column_map(fields: Mapping[str, str] | None) -> dict[str, str]:
    columns = {name: name for name in FIELDS}
    for name, column in dict(fields or {}).items():
        if name not in FIELDS:
            raise ValueError(f"fields: unknown field {name!r}; known fields are {', '.join(FIELDS)}")
        if not isinstance(column, str) or not column:
            raise ValueError(f"fields: column for {name!r} must be a non-empty string, got {column!r}")
        columns[name] = column
    return columns


def _check_columns(path: Path, columns: dict[str, str], seen: list[str]) -> None:
    """File-level checks: a missing required column would fail every row, so say it once, with a fix."""
    for name in REQUIRED_FIELDS:
        if columns[name] not in seen:
            alias = next((a for a in _ALIASES.get(name, ()) if a in seen), None)
            hint = f"; map it with fields={{'{name}': '{alias}'}}" if alias else ""
            raise MetadataError(
                f"{path}: no {columns[name]!r} column for the {name} (columns: {', '.join(seen) or 'none'}){hint}"
            )
    unused = [c for c in seen if c not in columns.values()]
    if unused:
        # Unmapped columns are often misnamed fields ("key", "time_sig"); say so instead of training without them.
        log.warning(
            "%s: columns %s are not used (known fields: %s; map a column with fields={'keyscale': 'key'})",
            path, unused, ", ".join(FIELDS),
        )


def _to_record(
    data: dict[str, Any], row: int, path: Path, base: Path, columns: dict[str, str], problems: Problems, where: str
) -> Record | None:
    def get(name: str) -> Any:
        return data.get(columns[name])

    errors: list[str] = []
    values: dict[str, Any] = {}

    audio = get("audio")
    if is_missing(audio):
        errors.append(f"no audio path in column {columns['audio']!r}")
    elif not isinstance(audio, str):
        errors.append(f"audio path must be text, got {audio!r}")
    else:
        audio_path = (base / Path(audio).expanduser()).resolve()
        if not audio_path.is_file():
            errors.append(f"audio file not found: {audio_path}")
        values["audio"] = audio_path

    prompt = get("prompt")
    if prompt is None or (isinstance(prompt, str) and not prompt.strip()):
        errors.append(f"no prompt in column {columns['prompt']!r}")
    elif not isinstance(prompt, str):
        errors.append(f"prompt must be text, got {prompt!r:.80}")
    values["prompt"] = prompt

    lyrics = get("lyrics")
    if lyrics is not None and not isinstance(lyrics, str):
        errors.append(f"lyrics must be text, got {lyrics!r}")
    values["lyrics"] = lyrics or ""

    parsers = {
        "bpm": parse_bpm,
        "keyscale": parse_keyscale,
        "timesignature": parse_timesignature,
        "vocal_language": parse_language,
        "duration": parse_duration,
    }
    unknown: dict[str, str] = {}  # optional metas that do not parse: the row trains with them unknown
    for name, parse in parsers.items():
        try:
            values[name] = parse(get(name))
        except ValueError as e:
            values[name] = parse(None)
            unknown[name] = str(e)

    if errors:
        problems.report(where, "; ".join(errors + list(unknown.values())))
        return None
    if unknown:
        # The audio and caption are fine: dropping the row would lose a good example over a label the model can
        # learn without (unknown metas are what it sees as "N/A" anyway).
        problems.warn(f"{where} ({values['audio'].name})",
                      f"{'; '.join(unknown.values())}; training with {', '.join(unknown)} unknown")
    given_id = get("id")
    record_id = str(given_id) if not is_missing(given_id) else f"{path.name}:{row}"
    return Record(id=record_id, row=row, source=path, **values)


def _read(path: Path) -> tuple[list[tuple[int, dict[str, Any] | Exception]], list[str]]:
    """Rows as (row number, object or the parse error of that row), plus the column names seen in order."""
    suffix = path.suffix.lower()
    if suffix not in FORMATS:
        raise MetadataError(f"{path}: unsupported metadata format {suffix or '(no extension)'!r}; "
                            f"expected one of {', '.join(FORMATS)}")
    if not path.is_file():
        raise MetadataError(f"{path}: metadata file not found")
    try:
        # utf-8-sig: spreadsheet exports often start with a byte-order mark that would otherwise end up in
        # the first column's name.
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise MetadataError(f"{path}: not a UTF-8 text file, so not {suffix[1:].upper()} ({e})") from e
    reader = {".csv": _read_csv, ".json": _read_json, ".jsonl": _read_jsonl}[suffix]
    rows = list(reader(path, text))
    seen: dict[str, None] = {}
    if suffix == ".csv":
        seen.update(dict.fromkeys(_csv_header(path, text)))
    for _, data in rows:
        if isinstance(data, dict):
            seen.update(dict.fromkeys(data))
    return rows, list(seen)


def _csv_header(path: Path, text: str) -> list[str]:
    header = next(csv.reader(io.StringIO(text, newline="")), None)
    if not header or not any(h.strip() for h in header):
        raise MetadataError(f"{path}: CSV has no header row (the first line must name the columns)")
    duplicates = sorted({h for h in header if header.count(h) > 1})
    if duplicates:
        raise MetadataError(f"{path}: CSV header repeats column(s) {duplicates}")
    return header


def _read_csv(path: Path, text: str) -> Iterator[tuple[int, dict[str, Any] | Exception]]:
    header = _csv_header(path, text)
    # newline="": quoted cells may contain line breaks (multi-line lyrics); csv needs the raw line endings.
    reader = csv.reader(io.StringIO(text, newline=""))
    next(reader)
    line = reader.line_num
    try:
        for values in reader:
            row, line = line + 1, reader.line_num
            if not values or values == [""]:  # blank line
                continue
            if len(values) > len(header):
                yield row, MetadataError(f"{len(values)} values but the header has {len(header)} columns")
                continue
            # Short rows: trailing columns are missing (None), which the field checks then report if required.
            yield row, {k: v for k, v in zip(header, values)}
    except csv.Error as e:
        raise MetadataError(f"{path} row {line + 1}: not valid CSV ({e})") from e


def _read_json(path: Path, text: str) -> Iterator[tuple[int, dict[str, Any] | Exception]]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise MetadataError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(data, list):
        keys = f" with keys {sorted(data)[:10]}" if isinstance(data, dict) else ""
        raise MetadataError(f"{path}: expected a JSON list of objects, got a {type(data).__name__}{keys}")
    for i, item in enumerate(data, start=1):
        yield i, item if isinstance(item, dict) else MetadataError(f"expected an object, got {item!r:.80}")


def _read_jsonl(path: Path, text: str) -> Iterator[tuple[int, dict[str, Any] | Exception]]:
    for i, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as e:
            yield i, MetadataError(f"not valid JSON ({e.msg} at column {e.colno})")
            continue
        yield i, item if isinstance(item, dict) else MetadataError(f"expected an object, got {item!r:.80}")
