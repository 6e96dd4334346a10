"""Response files (save/load round trip, validation) and the one entry id."""

from __future__ import annotations

import json

import pytest

from helpers.responses import entry_id, load_responses, save_responses

ENTRY = {"instruction": "Name the capital of France.", "input": "", "output": "Paris."}


def test_save_and_load_roundtrip_and_validation(tmp_path):
    entries = [{**ENTRY, "model_response": "Paris"}]
    path = save_responses(entries, tmp_path / "r.json", metadata={"model": "tiny"})
    rs = load_responses(path)
    assert rs.entries == entries and rs.metadata == {"model": "tiny"}
    assert not list(tmp_path.glob(".*tmp"))  # the temporary file was renamed away
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([ENTRY]))
    with pytest.raises(ValueError, match="entry 0 lacks a text field 'model_response'"):
        load_responses(bad)
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="bad.json: not valid JSON"):
        load_responses(bad)
    bad.write_bytes(b'[{"instruction": "\xff"}]')
    with pytest.raises(ValueError, match="bad.json: not UTF-8"):
        load_responses(bad)
    with pytest.raises(FileNotFoundError, match="missing.json"):
        load_responses(tmp_path / "missing.json")


def test_chapter_file_loads_without_metadata(responses_path):
    rs = load_responses(responses_path)
    assert len(rs.entries) == 110 and rs.metadata == {}


def test_entry_id_changes_with_every_text_and_only_them():
    answered = {**ENTRY, "model_response": "Paris"}
    key = entry_id(answered)
    assert key == entry_id({**answered, "extra": "ignored"}) and len(key) == 16
    for field in ("instruction", "input", "output", "model_response"):
        assert entry_id({**answered, field: answered[field] + "!"}) != key, field
    assert entry_id({**ENTRY, "answer": "Paris"}, "answer") == key
