"""Metadata reading: formats, field mapping, value normalisation and every bad-input message."""

from __future__ import annotations

import csv
import json
import logging
import re
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from datamodules.errors import MetadataError
from datamodules.metadata import load_metadata
from datamodules.values import parse_bpm, parse_keyscale, parse_language, parse_timesignature


def _wav(path: Path, seconds: float = 0.1) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(path, np.zeros((int(48000 * seconds), 2), dtype=np.float32), 48000)
    return path


def _csv(path: Path, header: list[str], rows: list[list]) -> Path:
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
    return path


HEADER = ["audio", "prompt", "lyrics", "bpm", "keyscale", "timesignature", "vocal_language"]


@pytest.fixture
def audio_dir(tmp_path: Path) -> Path:
    for name in ("a.wav", "b.wav", "c.wav"):
        _wav(tmp_path / name)
    return tmp_path


def test_diffsynth_metadata_json_loads_unchanged(audio_dir: Path) -> None:
    # The layout of DiffSynth-Studio's example dataset (examples/ace_step/model_training, --data_file_keys audio).
    items = [
        {"audio": "a.wav", "prompt": "pop, female vocals", "lyrics": "[verse]\nhello", "bpm": 120,
         "keyscale": "C major", "timesignature": "4", "vocal_language": "en"},
        {"audio": "b.wav", "prompt": "lo-fi beat", "lyrics": "[Instrumental]", "bpm": 85,
         "keyscale": "A minor", "timesignature": "4", "vocal_language": "unknown", "duration": 30},
    ]
    meta = audio_dir / "metadata.json"
    meta.write_text(json.dumps(items))
    records = load_metadata(meta, base_path=audio_dir)
    assert [r.audio for r in records] == [audio_dir / "a.wav", audio_dir / "b.wav"]
    first, second = records
    assert (first.prompt, first.lyrics, first.bpm, first.keyscale, first.timesignature, first.vocal_language) == (
        "pop, female vocals", "[verse]\nhello", 120, "C major", "4", "en")
    assert first.duration is None and second.duration == 30.0
    assert (first.row, second.row) == (1, 2) and first.id == "metadata.json:1"


def test_csv_jsonl_field_mapping_and_base_path(tmp_path: Path) -> None:
    _wav(tmp_path / "songs" / "x.wav")
    meta_dir = tmp_path / "meta"
    meta_dir.mkdir()
    csv_path = _csv(meta_dir / "m.csv", ["file", "caption", "key", "time_sig", "id"],
                    [["x.wav", "jazz", "bb MIN", "3/4", "song-x"]])
    [rec] = load_metadata(csv_path, base_path=tmp_path / "songs",
                          fields={"audio": "file", "prompt": "caption", "keyscale": "key", "timesignature": "time_sig"})
    assert (rec.audio, rec.keyscale, rec.timesignature, rec.id, rec.row) == (
        tmp_path / "songs" / "x.wav", "Bb minor", "3", "song-x", 2)
    # Default base path: the metadata file's own directory.
    jsonl = tmp_path / "songs" / "m.jsonl"
    jsonl.write_text('{"audio": "x.wav", "prompt": "a"}\n\n{"audio": "x.wav", "prompt": "b", "bpm": "99.6"}\n')
    records = load_metadata(jsonl)
    assert [(r.row, r.prompt, r.bpm) for r in records] == [(1, "a", None), (3, "b", 100)]


def test_repeat_copies_rows_in_order(audio_dir: Path) -> None:
    meta = _csv(audio_dir / "m.csv", ["audio", "prompt"], [["a.wav", "one"], ["b.wav", "two"]])
    records = load_metadata(meta, repeat=3)
    assert [(r.prompt, r.repeat) for r in records] == [
        ("one", 0), ("two", 0), ("one", 1), ("two", 1), ("one", 2), ("two", 2)]
    with pytest.raises(ValueError, match="repeat"):
        load_metadata(meta, repeat=0)


def test_csv_rows_are_numbered_as_the_user_sees_them(audio_dir: Path) -> None:
    # Multi-line lyrics make a record span lines; the row reported is the line the record starts on.
    meta = _csv(audio_dir / "m.csv", ["audio", "prompt", "lyrics"],
                [["a.wav", "one", "line1\nline2\nline3"], ["missing.wav", "two", ""]])
    with pytest.raises(MetadataError, match=r"m\.csv row 5: audio file not found"):
        load_metadata(meta, on_error="raise")
    # A bad record that itself spans lines is reported at its first line.
    meta = _csv(audio_dir / "m.csv", ["audio", "prompt", "lyrics"],
                [["a.wav", "one", ""], ["missing.wav", "two", "l1\nl2\nl3"]])
    with pytest.raises(MetadataError, match=r"m\.csv row 3: audio file not found"):
        load_metadata(meta, on_error="raise")


@pytest.mark.parametrize(
    "row, problem",
    [
        (["", "p", "", "", "", "", ""], "no audio path in column 'audio'"),
        (["nope.wav", "p", "", "", "", "", ""], "audio file not found: "),
        (["a.wav", "", "", "", "", "", ""], "no prompt in column 'prompt'"),
        (["a.wav", "p", "", "", "", "", "", "extra"], "8 values but the header has 7 columns"),
        # A row dropped for a required field also lists its bad metas, so one message says everything.
        (["nope.wav", "p", "", "fast", "", "", ""], "audio file not found: .*; bpm 'fast' is not a number"),
    ],
)
def test_bad_row_messages_name_file_row_and_problem(audio_dir: Path, row: list, problem: str) -> None:
    meta = _csv(audio_dir / "meta.csv", HEADER, [["b.wav", "fine", "", "", "", "", ""], row])
    with pytest.raises(MetadataError) as info:
        load_metadata(meta, on_error="raise")
    message = str(info.value)
    assert message.startswith(f"{meta} row 3: ") and re.search(problem, message), message


@pytest.mark.parametrize(
    "cells, problem, unknown",
    [
        (["fast", "", "", ""], "bpm 'fast' is not a number", "bpm"),
        (["400", "", "", ""], "bpm '400' is outside 30-300", "bpm"),
        (["nan", "", "", ""], "bpm 'nan' is not a finite number", "bpm"),
        (["", "H major", "", ""], "keyscale 'H major' does not parse", "keyscale"),
        (["", "Z major", "", ""], "keyscale 'Z major' does not parse", "keyscale"),
        (["", "C", "", ""], "keyscale 'C' has no mode", "keyscale"),
        (["", "", "5", ""], "timesignature '5' is not supported", "timesignature"),
        (["", "", "7/5", ""], "timesignature '7/5' is not supported", "timesignature"),
        (["", "", "four", ""], "timesignature 'four' does not parse", "timesignature"),
        (["", "", "", "klingon"], "vocal_language 'klingon' is not one of", "vocal_language"),
        (["fast", "Z major", "", ""], "bpm 'fast' is not a number; keyscale 'Z major'", "bpm, keyscale"),
    ],
)
@pytest.mark.parametrize("on_error", ["skip", "raise"])
def test_bad_optional_metas_train_as_unknown_with_a_warning(
    audio_dir: Path, caplog: pytest.LogCaptureFixture, cells: list, problem: str, unknown: str, on_error: str,
) -> None:
    """The audio and caption are fine, so the row is kept (under either policy) with those metas unknown."""
    meta = _csv(audio_dir / "meta.csv", HEADER,
                [["b.wav", "fine", "", "", "", "", ""], ["a.wav", "p", "la la", *cells]])
    with caplog.at_level(logging.WARNING, logger="datamodules"):
        records = load_metadata(meta, on_error=on_error)
    assert [r.row for r in records] == [2, 3]
    rec = records[1]
    assert (rec.prompt, rec.lyrics) == ("p", "la la")
    for name in unknown.split(", "):
        assert getattr(rec, name) == ("unknown" if name == "vocal_language" else None)
    mentions = [r.getMessage() for r in caplog.records if "a.wav" in r.getMessage()]
    assert len(mentions) == 1, mentions  # reported once, where it was found
    assert mentions[0].startswith(f"{meta} row 3 (a.wav): {problem}")
    assert mentions[0].endswith(f"training with {unknown} unknown")


def test_skip_warns_per_row_and_summarises(audio_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    rows = [["a.wav", "ok", "", "120", "C major", "4", "en"],
            ["missing.wav", "x", "", "", "", "", ""],
            ["b.wav", "", "", "", "", "", ""],
            ["c.wav", "ok", "", "1000", "Q major", "", ""],
            ["c.wav", "ok too", "", "", "", "", ""]]
    meta = _csv(audio_dir / "meta.csv", HEADER, rows)
    with caplog.at_level(logging.WARNING, logger="datamodules"):
        records = load_metadata(meta)  # on_error="skip" is the default
    assert [r.row for r in records] == [2, 5, 6]
    warnings = [r.getMessage() for r in caplog.records]
    assert any(f"{meta} row 3: audio file not found" in w for w in warnings)
    assert any(f"{meta} row 4: no prompt" in w for w in warnings)
    # Both problems of row 5 are reported together; the row trains with them unknown.
    assert any(f"{meta} row 5 (c.wav): bpm '1000' is outside 30-300; keyscale 'Q major'" in w for w in warnings)
    assert (records[1].bpm, records[1].keyscale) == (None, None)
    # The summary counts; it does not repeat the messages (each problem is reported exactly once).
    assert f"{meta}: skipped 2 of 5 rows, kept 1 with warnings (each reported above)" in warnings
    assert sum("missing.wav" in w for w in warnings) == 1


def test_no_usable_rows_raises_even_when_skipping(audio_dir: Path) -> None:
    meta = _csv(audio_dir / "meta.csv", ["audio", "prompt"], [["gone.wav", "x"]])
    with pytest.raises(MetadataError, match=r"no usable rows \(of 1\)"):
        load_metadata(meta)


def test_file_level_errors(tmp_path: Path) -> None:
    txt = tmp_path / "meta.txt"
    txt.write_text("audio,prompt\n")
    with pytest.raises(MetadataError, match=r"meta\.txt: unsupported metadata format '\.txt'; expected one of"):
        load_metadata(txt)
    with pytest.raises(MetadataError, match="metadata file not found"):
        load_metadata(tmp_path / "absent.csv")
    bad_json = tmp_path / "m.json"
    bad_json.write_text("[{'audio': 1}]")
    with pytest.raises(MetadataError, match=r"m\.json: not valid JSON"):
        load_metadata(bad_json)
    bad_json.write_text('{"samples": []}')
    with pytest.raises(MetadataError, match=r"expected a JSON list of objects, got a dict with keys \['samples'\]"):
        load_metadata(bad_json)
    binary = tmp_path / "m.csv"
    binary.write_bytes(b"\xff\xfe\x00\x81binary")
    with pytest.raises(MetadataError, match=r"m\.csv: not a UTF-8 text file, so not CSV"):
        load_metadata(binary)
    empty = tmp_path / "e.csv"
    empty.write_text("")
    with pytest.raises(MetadataError, match="CSV has no header row"):
        load_metadata(empty)


def test_bad_json_items_and_jsonl_lines_name_their_row(audio_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    meta = audio_dir / "m.jsonl"
    meta.write_text('{"audio": "a.wav", "prompt": "ok"}\n{"audio": "a.wav", "prompt": \n["a.wav"]\n')
    with pytest.raises(MetadataError, match=r"m\.jsonl row 2: not valid JSON"):
        load_metadata(meta, on_error="raise")
    assert [r.row for r in load_metadata(meta)] == [1]
    js = audio_dir / "m.json"
    js.write_text(json.dumps([{"audio": "a.wav", "prompt": "ok"}, "a.wav", {"audio": 3, "prompt": 4}]))
    with pytest.raises(MetadataError, match=r"m\.json row 2: expected an object"):
        load_metadata(js, on_error="raise")
    with caplog.at_level(logging.WARNING, logger="datamodules"):
        assert [r.row for r in load_metadata(js)] == [1]
    assert any(f"{js} row 3: audio path must be text, got 3; prompt must be text" in r.getMessage()
               for r in caplog.records)


def test_missing_required_column_suggests_a_mapping(audio_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    meta = _csv(audio_dir / "m.csv", ["audio", "caption", "key"], [["a.wav", "x", "C major"]])
    with pytest.raises(MetadataError, match=r"no 'prompt' column for the prompt .*fields=\{'prompt': 'caption'\}"):
        load_metadata(meta)
    with caplog.at_level(logging.WARNING, logger="datamodules"):
        [rec] = load_metadata(meta, fields={"prompt": "caption"})
    # "key" is not our name for the key: it is reported, not silently dropped (or silently guessed).
    assert rec.keyscale is None
    assert any("columns ['key'] are not used" in r.getMessage() for r in caplog.records)
    with pytest.raises(ValueError, match="unknown field 'caption'"):
        load_metadata(meta, fields={"caption": "prompt"})
    with pytest.raises(ValueError, match="on_error must be one of"):
        load_metadata(meta, on_error="ignore")


@pytest.mark.parametrize(
    "raw, expected",
    [("C major", "C major"), ("c Major", "C major"), ("F#min", "F# minor"), ("F♯ minor", "F# minor"),
     ("Bb major", "Bb major"), ("B♭ maj", "Bb major"), ("bb minor", "Bb minor"), ("Am", "A minor"),
     ("E flat major", "Eb major"), ("  G  minor ", "G minor"), ("N/A", None), ("", None), (None, None)],
)
def test_keyscale_normalisation(raw, expected) -> None:
    assert parse_keyscale(raw) == expected


@pytest.mark.parametrize("raw", ["C", "Bb", "H minor", "C dorian", "C##", 5])
def test_keyscale_rejects(raw) -> None:
    with pytest.raises(ValueError):
        parse_keyscale(raw)


def test_value_parsers() -> None:
    assert [parse_timesignature(v) for v in (4, "4", "4/4", "3/4", "6/8", "2/2", 3.0, "", None)] == [
        "4", "4", "4", "3", "6", "2", "3", None, None]
    for bad in ("5/4", "4/5", 7, "3.5", True):
        with pytest.raises(ValueError):
            parse_timesignature(bad)
    assert [parse_bpm(v) for v in (120, "120", 99.6, "N/A", None, 30, 300)] == [120, 120, 100, None, None, 30, 300]
    for bad in (29, 301, True, "1e9", [120]):
        with pytest.raises(ValueError):
            parse_bpm(bad)
    assert parse_language(None) == "unknown" and parse_language("EN") == "en"
