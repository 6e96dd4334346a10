"""Tests for helpers.data: loading, validation errors, verified download (offline), split."""

from __future__ import annotations

import functools
import hashlib
import http.server
import json
import threading
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import pytest

import helpers.data as data_mod
from helpers.data import (
    DATA_SHA256,
    DATA_URL,
    DATASET_ENV,
    ChecksumError,
    DatasetError,
    DataSplits,
    DownloadError,
    default_cache_dir,
    download_file,
    load_instruction_data,
    split_data,
)

GOOD = [
    {"instruction": "Add 2 and 3.", "input": "", "output": "5"},
    {"instruction": "Translate.", "input": "Hallo", "output": "Hello"},
]


def write_json(path: Path, obj: object) -> Path:
    path.write_text(json.dumps(obj), encoding="utf-8")
    return path


def write_jsonl(path: Path, rows: Iterable[object]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


# --- loading ----------------------------------------------------------------------------------


def test_constants() -> None:
    assert DATA_URL.endswith("ch07/01_main-chapter-code/instruction-data.json")
    assert DATA_SHA256 == "7e09a9af353722ca15c18bc580f093f9c39d3178335a75177319cb1e1d163944"
    assert DATASET_ENV == "COURSE_DATASET"


def test_load_chapter_file(chapter_data_path: Path, chapter_data: list[dict[str, str]]) -> None:
    data = load_instruction_data(chapter_data_path)
    assert data == chapter_data and len(data) == 1100
    assert sum(entry["input"] == "" for entry in data) == 775


def test_env_var_and_argument(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    env_file = write_json(tmp_path / "env.json", GOOD)
    arg_file = write_json(tmp_path / "arg.json", GOOD[:1])
    monkeypatch.setenv(DATASET_ENV, str(env_file))
    assert load_instruction_data() == GOOD
    assert load_instruction_data(arg_file) == GOOD[:1]  # an argument wins over the env var
    assert load_instruction_data(str(arg_file)) == GOOD[:1]


@pytest.mark.parametrize("name", ["data.jsonl", "data.json", "data.txt"])
def test_json_lines(tmp_path: Path, name: str) -> None:
    # .jsonl by suffix; other names are detected from the content.
    path = write_jsonl(tmp_path / name, GOOD)
    assert load_instruction_data(path) == GOOD


def test_json_lines_blank_lines_and_single_entry(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_text("\n" + json.dumps(GOOD[0]) + "\n\n" + json.dumps(GOOD[1]) + "\n\n")
    assert load_instruction_data(path) == GOOD
    one = tmp_path / "one.json"
    one.write_text(json.dumps(GOOD[0]))
    assert load_instruction_data(one) == GOOD[:1]


def test_extra_keys_are_kept(tmp_path: Path) -> None:
    rows = [dict(GOOD[0], model_response="5")]
    assert load_instruction_data(write_json(tmp_path / "r.json", rows)) == rows


# --- every bad input names file, entry and field ------------------------------------------------


@pytest.mark.parametrize(
    ("rows", "pattern"),
    [
        ([GOOD[0], "just text"], r"entry 1 must be an object"),
        ([GOOD[0], {"instruction": "x", "output": "y"}], r"entry 1 is missing the field 'input'"),
        ([{"input": "", "output": "y"}], r"entry 0 is missing the field 'instruction'"),
        ([{"instruction": "x", "input": ""}], r"entry 0 is missing the field 'output'"),
        ([GOOD[0], dict(GOOD[1], output=5)], r"entry 1, field 'output' must be a string, got int"),
        ([dict(GOOD[0], input=None)], r"entry 0, field 'input' must be a string, got NoneType"),
        ([GOOD[0], dict(GOOD[0], instruction="")], r"entry 1, field 'instruction' is empty"),
        ([dict(GOOD[0], output=" \n\t ")], r"entry 0, field 'output' is empty"),
        ([], r"the dataset has no entries"),
    ],
)
@pytest.mark.parametrize("fmt", ["json", "jsonl"])
def test_validation_errors(tmp_path: Path, rows: Any, pattern: str, fmt: str) -> None:
    path = tmp_path / f"bad.{fmt}"
    if fmt == "json":
        write_json(path, rows)
    else:
        write_jsonl(path, rows)
        if not rows:
            pattern = "empty"
    with pytest.raises(DatasetError, match=pattern) as info:
        load_instruction_data(path)
    assert str(path) in str(info.value)


def test_empty_input_is_allowed(tmp_path: Path) -> None:
    assert load_instruction_data(write_json(tmp_path / "d.json", GOOD[:1]))[0]["input"] == ""


@pytest.mark.parametrize(
    ("text", "suffix", "pattern"),
    [
        ('[{"instruction": "a", "input": "", "output": "b"},\n oops]', ".json", "line 2, column 2"),
        (json.dumps(GOOD[0]) + "\n{not json}\n", ".jsonl", "line 2 \\(entry 1\\)"),
        (json.dumps(GOOD[0]) + "\n{not json}\n", ".json", "line 2 \\(entry 1\\)"),
        ("", ".json", "the file is empty"),
        ("   \n", ".jsonl", "the file is empty"),
        (json.dumps({"data": GOOD}, indent=2), ".json", "expected a JSON list"),
        ('"text"', ".json", "expected a JSON list"),
    ],
)
def test_parse_errors(tmp_path: Path, text: Any, suffix: str, pattern: str) -> None:
    path = tmp_path / f"bad{suffix}"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(DatasetError, match=pattern) as info:
        load_instruction_data(path)
    assert str(path) in str(info.value)


def test_missing_and_binary_files(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="no such dataset file"):
        load_instruction_data(tmp_path / "nope.json")
    binary = tmp_path / "bin.json"
    binary.write_bytes(b"\xff\xfe\x00[")
    with pytest.raises(DatasetError, match="not UTF-8"):
        load_instruction_data(binary)


# --- download (offline: a local server on 127.0.0.1 and file:// URLs) -------------------------


@pytest.fixture()
def server(tmp_path: Path) -> Iterator[tuple[Path, str]]:
    """Serve tmp_path/www over HTTP on 127.0.0.1; yields (www dir, base url)."""
    www = tmp_path / "www"
    www.mkdir()

    class QuietHandler(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:  # keep test output clean
            pass

    httpd = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(QuietHandler, directory=str(www))
    )
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield www, f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_download_default_path(
    server: tuple[Path, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    www, base = server
    source = write_json(www / "instruction-data.json", GOOD)
    monkeypatch.delenv(DATASET_ENV, raising=False)
    monkeypatch.setattr(data_mod, "DATA_URL", f"{base}/instruction-data.json")
    monkeypatch.setattr(data_mod, "DATA_SHA256", digest(source))
    cache = tmp_path / "cache"
    assert load_instruction_data(cache_dir=cache) == GOOD
    assert sorted(p.name for p in cache.iterdir()) == ["instruction-data.json"]
    # Cached and verified: works with the server's copy gone.
    source.unlink()
    assert load_instruction_data(cache_dir=cache) == GOOD


def test_download_digest_mismatch_leaves_nothing(server: tuple[Path, str], tmp_path: Path) -> None:
    www, base = server
    source = write_json(www / "d.json", GOOD)
    url = f"{base}/d.json"
    dest = tmp_path / "cache" / "d.json"
    wrong = "0" * 64
    with pytest.raises(ChecksumError) as info:
        download_file(url, dest, wrong, progress=False)
    message = str(info.value)
    assert url in message and wrong in message and digest(source) in message
    assert list(dest.parent.iterdir()) == []  # no file, no partial temp file


def test_download_replaces_corrupt_cache(server: tuple[Path, str], tmp_path: Path) -> None:
    www, base = server
    source = write_json(www / "d.json", GOOD)
    dest = tmp_path / "d.json"
    dest.write_text("corrupt")
    assert download_file(f"{base}/d.json", dest, digest(source), progress=False) == dest
    assert dest.read_bytes() == source.read_bytes()


def test_download_mismatch_keeps_existing_good_file_untouched(tmp_path: Path) -> None:
    # A failed download never overwrites: the old file is only replaced by verified bytes.
    src = write_json(tmp_path / "src.json", GOOD)
    dest = tmp_path / "cache" / "d.json"
    dest.parent.mkdir()
    dest.write_text("old")
    with pytest.raises(ChecksumError):
        download_file(src.as_uri(), dest, "f" * 64, progress=False)
    assert dest.read_text() == "old"
    assert sorted(p.name for p in dest.parent.iterdir()) == ["d.json"]


def test_download_file_url_and_no_digest(tmp_path: Path) -> None:
    src = write_json(tmp_path / "src.json", GOOD)
    dest = tmp_path / "sub" / "copy.json"
    assert download_file(src.as_uri(), dest, digest(src), progress=False) == dest
    assert dest.read_bytes() == src.read_bytes()
    other = download_file(src.as_uri(), tmp_path / "x.json", None, progress=False)
    assert other.read_bytes() == src.read_bytes()


def test_download_http_error_names_url(
    server: tuple[Path, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _, base = server
    url = f"{base}/missing.json"
    with pytest.raises(DownloadError, match="missing.json") as info:
        download_file(url, tmp_path / "dl" / "m.json", None, progress=False)
    assert url in str(info.value)
    assert list((tmp_path / "dl").iterdir()) == []
    # Through load_instruction_data the error also says how to work offline.
    monkeypatch.delenv(DATASET_ENV, raising=False)
    monkeypatch.setattr(data_mod, "DATA_URL", url)
    with pytest.raises(DownloadError, match=DATASET_ENV):
        load_instruction_data(cache_dir=tmp_path / "cache")


def test_default_cache_dir_is_git_ignored() -> None:
    cache = default_cache_dir()
    assert cache.parts[-2:] == ("data", "cache")
    gitignore = cache.parents[1] / ".gitignore"
    assert "data/cache/" in gitignore.read_text().splitlines()


# --- split ------------------------------------------------------------------------------------


def test_split_chapter_sizes(chapter_data: list[dict[str, str]]) -> None:
    splits = split_data(chapter_data)
    assert isinstance(splits, DataSplits)
    assert (len(splits.train), len(splits.validation), len(splits.test)) == (935, 55, 110)
    # The chapter's order: train, then test, then validation from the end.
    assert splits.train == chapter_data[:935]
    assert splits.test == chapter_data[935:1045]
    assert splits.validation == chapter_data[1045:]


def test_split_shuffle_is_seeded(chapter_data: list[dict[str, str]]) -> None:
    before = list(chapter_data)
    a = split_data(chapter_data, shuffle=True)
    b = split_data(chapter_data, shuffle=True, seed=123)
    c = split_data(chapter_data, shuffle=True, seed=1)
    assert a == b and a.train != c.train
    assert chapter_data == before  # the input is not shuffled in place
    everything = a.train + a.validation + a.test
    key = lambda e: json.dumps(e, sort_keys=True)  # noqa: E731
    assert sorted(map(key, everything)) == sorted(map(key, chapter_data))


def test_split_custom_fractions() -> None:
    items = [{"i": n} for n in range(10)]
    splits = split_data(items, 0.5, 0.3)
    assert [len(s) for s in splits] == [5, 2, 3]
    assert [len(s) for s in split_data(items, 1.0, 0.0)] == [10, 0, 0]


@pytest.mark.parametrize(
    ("train", "test", "pattern"),
    [
        (1.2, 0.1, "train_frac"),
        (-0.1, 0.1, "train_frac"),
        (0.8, 0.3, "<= 1"),
        (0.8, "x", "test_frac"),
    ],
)
def test_split_bad_fractions(train: float, test: Any, pattern: str) -> None:
    with pytest.raises(ValueError, match=pattern):
        split_data([{"i": 1}], train, test)


def test_single_entry_json_lines_with_final_newline(tmp_path: Path) -> None:
    path = tmp_path / "one.json"
    path.write_text('{"instruction": "Say hi.", "input": "", "output": "Hi."}\n', encoding="utf-8")
    assert load_instruction_data(path) == [{"instruction": "Say hi.", "input": "", "output": "Hi."}]


def test_alpaca_format_file_loads(tmp_path: Path) -> None:
    """Exercise 7.3: the original Alpaca file (52,002 entries) has the same keys; a small one."""
    entries = [
        {
            "instruction": f"Give three tips number {i}.",
            "input": "" if i % 2 else "x",
            "output": f"Tip {i}.",
        }  # fmt: skip
        for i in range(20)
    ]
    path = tmp_path / "alpaca_data.json"
    path.write_text(json.dumps(entries, indent=4), encoding="utf-8")
    assert load_instruction_data(path) == entries
    splits = split_data(load_instruction_data(path))
    assert [len(s) for s in splits] == [17, 1, 2]


def test_byte_order_mark_is_not_data(tmp_path: Path) -> None:
    path = tmp_path / "bom.json"
    entry = {"instruction": "Say hi.", "input": "", "output": "Hi."}
    path.write_text("\ufeff" + json.dumps([entry]), encoding="utf-8")
    assert load_instruction_data(path) == [entry]


def test_deeply_nested_json_is_one_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "deep.json"
    path.write_text("[" * 100_000 + "]" * 100_000, encoding="utf-8")
    with pytest.raises(DatasetError, match="deep.json: the JSON is nested too deeply"):
        load_instruction_data(path)
