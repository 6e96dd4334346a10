"""Response files (save/load round trip, validation) and the one entry id."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import helpers.review.responses as responses
from helpers.data import ChecksumError, DownloadError, sha256_of
from helpers.review.responses import (
    PUBLISHED_RESPONSES_SHA256,
    entry_id,
    load_responses,
    published_responses_path,
    save_responses,
)

ENTRY = {"instruction": "Name the capital of France.", "input": "", "output": "Paris."}


def test_save_and_load_roundtrip_and_validation(tmp_path: Path) -> None:
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


def test_chapter_file_loads_without_metadata(responses_path: Path) -> None:
    rs = load_responses(responses_path)
    assert len(rs.entries) == 110 and rs.metadata == {}


def test_entry_id_changes_with_every_text_and_only_them() -> None:
    answered = {**ENTRY, "model_response": "Paris"}
    key = entry_id(answered)
    assert key == entry_id({**answered, "extra": "ignored"}) and len(key) == 16
    for field in ("instruction", "input", "output", "model_response"):
        assert entry_id({**answered, field: answered[field] + "!"}) != key, field
    assert entry_id({**ENTRY, "answer": "Paris"}, "answer") == key


def test_published_responses_path_env_override(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    local = tmp_path / "mine.json"
    local.write_text("[]", encoding="utf-8")
    monkeypatch.setenv("COURSE_RESPONSES", str(local))
    assert published_responses_path(cache_dir=tmp_path / "cache") == local
    assert not (tmp_path / "cache").exists()  # nothing downloaded
    monkeypatch.setenv("COURSE_RESPONSES", str(tmp_path / "missing.json"))
    with pytest.raises(FileNotFoundError, match="COURSE_RESPONSES"):
        published_responses_path()


def test_published_responses_path_downloads_verified_once(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    source = tmp_path / "published.json"
    source.write_text('[{"instruction": "a", "output": "b", "model_response": "c"}]\n')
    monkeypatch.delenv("COURSE_RESPONSES", raising=False)
    monkeypatch.setattr(responses, "PUBLISHED_RESPONSES_URL", source.as_uri())
    monkeypatch.setattr(responses, "PUBLISHED_RESPONSES_SHA256", sha256_of(source))
    path = published_responses_path(cache_dir=tmp_path / "cache")
    assert path == tmp_path / "cache" / "instruction-data-with-response.json"
    assert load_responses(path).entries[0]["model_response"] == "c"
    source.unlink()  # the second call reuses the verified copy
    assert published_responses_path(cache_dir=tmp_path / "cache") == path
    # A wrong digest leaves nothing; an unreachable URL says how to work offline.
    monkeypatch.setattr(responses, "PUBLISHED_RESPONSES_SHA256", "0" * 64)
    path.unlink()
    source.write_text("[]")
    with pytest.raises(ChecksumError):
        published_responses_path(cache_dir=tmp_path / "cache")
    assert not path.exists()
    source.unlink()
    with pytest.raises(DownloadError, match="COURSE_RESPONSES"):
        published_responses_path(cache_dir=tmp_path / "cache")


def test_published_responses_digest_matches_the_chapter_file(responses_path: Path) -> None:
    assert sha256_of(responses_path) == PUBLISHED_RESPONSES_SHA256
