"""Preference data: loading and validation, the book's file, and generating pairs offline or
through a fake Ollama / OpenAI-compatible server on 127.0.0.1 (stdlib http.server, no mocks)."""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from helpers.data import DatasetError
from helpers.dpo.generate_pairs import (
    RULE_BASED,
    choose_politeness,
    clean_reply,
    generate_preferences,
    read_rewrite_cache,
    rewrite_prompt,
    rule_based_rewrite,
)
from helpers.dpo.preferences import (
    PREFERENCES_ENV,
    PREFERENCES_SHA256,
    EmptyPreferenceError,
    MissingPreferenceError,
    PreferenceDataError,
    load_preferences,
    save_preferences,
    style_shares,
    validate_preferences,
)
from helpers.review.judge import ollama_client, openai_client

SHARED = Path(__file__).resolve().parents[3] / "shared"


def _entry(i: int, **extra: Any) -> dict[str, Any]:
    return {"instruction": f"Say {i}.", "input": "", "output": f"The answer is {i}.", **extra}


def _pair(i: int) -> dict[str, Any]:
    return _entry(i, chosen=f"Certainly! {i}.", rejected=f"Whatever, {i}.")


@pytest.fixture(scope="module")
def preference_path() -> Path:
    path = Path(
        os.environ.get(PREFERENCES_ENV) or SHARED / "data" / "instruction-data-with-preference.json"
    )
    if not path.is_file():
        pytest.skip(f"needs instruction-data-with-preference.json (set {PREFERENCES_ENV})")
    return path


def test_the_books_file_loads_and_matches_its_checksum(
    preference_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from helpers.data import sha256_of

    assert sha256_of(preference_path) == PREFERENCES_SHA256
    monkeypatch.setenv(PREFERENCES_ENV, str(preference_path))
    entries = load_preferences()
    assert len(entries) == 1100
    assert all(e["chosen"].strip() and e["rejected"].strip() for e in entries)


def test_style_words_separate_the_books_chosen_and_rejected_answers(preference_path: Path) -> None:
    entries = load_preferences(preference_path)
    shares = {k: style_shares([e[k] for e in entries]) for k in ("output", "chosen", "rejected")}
    # Fine-tuning imitates `output`, which has neither; the pairs add one tone each.
    assert shares["output"]["polite"] < 0.01 and shares["output"]["impolite"] < 0.01
    assert round(shares["chosen"]["polite"], 2) == 0.18 and shares["chosen"]["impolite"] == 0.0
    assert round(shares["rejected"]["impolite"], 2) == 0.30
    assert shares["rejected"]["polite"] < 0.02


def test_style_shares_count_whole_words_in_any_case() -> None:
    answers = ["Indeed, it is Paris.", "Obviously Paris.", "Lookout Paris.", "I'd say Paris."]
    assert style_shares(answers) == {"polite": 0.5, "impolite": 0.25}
    with pytest.raises(ValueError, match="no answers"):
        style_shares([])


def test_missing_and_empty_answers_name_file_entry_and_field(tmp_path: Path) -> None:
    bad = tmp_path / "prefs.json"
    bad.write_text(json.dumps([_pair(0), _entry(1, chosen="yes")]))
    with pytest.raises(
        MissingPreferenceError, match=r"prefs\.json: entry 1 is missing the field 'rejected'"
    ):
        load_preferences(bad)
    bad.write_text(json.dumps([_pair(0), _pair(1), _entry(2, chosen="  ", rejected="no")]))
    with pytest.raises(
        EmptyPreferenceError, match=r"prefs\.json: entry 2, field 'chosen' is empty"
    ):
        load_preferences(bad)
    with pytest.raises(PreferenceDataError, match="entry 0, field 'rejected' must be a string"):
        validate_preferences([_entry(0, chosen="a", rejected=None)], "x.json")
    # The instruction fields are checked as for the chapter's dataset.
    with pytest.raises(DatasetError, match="entry 0 is missing the field 'output'"):
        validate_preferences([{"instruction": "a", "input": "", "chosen": "b", "rejected": "c"}])
    with pytest.raises(PreferenceDataError, match="no such preference file"):
        load_preferences(tmp_path / "nope.json")
    assert issubclass(PreferenceDataError, DatasetError)


def test_save_then_load_round_trips_json_and_jsonl(tmp_path: Path) -> None:
    pairs = [_pair(i) for i in range(3)]
    path = save_preferences(pairs, tmp_path / "out" / "p.json")
    assert load_preferences(path) == pairs
    jsonl = tmp_path / "p.jsonl"
    jsonl.write_text("".join(json.dumps(p) + "\n" for p in pairs))
    assert load_preferences(jsonl) == pairs
    assert not [p for p in path.parent.iterdir() if p.name != "p.json"]  # no temp files left


def test_rule_based_pairs_are_deterministic_and_labelled_synthetic() -> None:
    entries = [_entry(i) for i in range(20)]
    pairs = generate_preferences(entries, progress=False)
    assert pairs == generate_preferences(list(reversed(entries)), progress=False)[::-1]
    assert {p["politeness"] for p in pairs} == {"polite", "impolite"}  # both directions occur
    for entry, pair in zip(entries, pairs, strict=True):
        assert pair["generator"] == RULE_BASED
        if pair["politeness"] == "polite":
            assert pair["chosen"] == "Certainly! " + entry["output"]
            assert pair["rejected"] == entry["output"]
        else:
            assert pair["chosen"] == entry["output"]
            assert pair["rejected"] == rule_based_rewrite(entry, "impolite")
            assert pair["rejected"].startswith("Ugh")
    validate_preferences(pairs)
    # Another seed flips some choices.
    assert [p["politeness"] for p in generate_preferences(entries, seed=7, progress=False)] != [
        p["politeness"] for p in pairs
    ]


def test_clean_reply_and_prompt() -> None:
    assert clean_reply('  "Sure, here it is."\n') == "Sure, here it is."
    assert clean_reply("`x`") == "x"
    prompt = rewrite_prompt(_entry(3), "impolite")
    assert "slightly rewrite the output to be more impolite" in prompt
    assert "`The answer is 3.`" in prompt and "### Instruction:\nSay 3." in prompt


class _FakeLLM(BaseHTTPRequestHandler):
    """Answers /api/chat (Ollama) and /v1/chat/completions (OpenAI) with a scripted rewrite."""

    calls: list[str] = []
    fail_after: int | None = None

    def log_message(self, *args: Any) -> None:  # keep test output quiet
        pass

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming): the clients' "is it up?" check
        data = json.dumps({"models": [], "data": []}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        prompt = body["messages"][0]["content"]
        if _FakeLLM.fail_after is not None and len(_FakeLLM.calls) >= _FakeLLM.fail_after:
            self.send_response(400)
            self.end_headers()
            self.wfile.write(b"stop")
            return
        _FakeLLM.calls.append(prompt)
        output = prompt.split("correct output `")[1].split("`")[0]
        kind = "POLITE" if "more polite." in prompt else "RUDE"
        text = f'"{kind}: {output}"'  # quoted, as chat models often do
        if self.path == "/api/chat":
            reply = {"message": {"role": "assistant", "content": text}, "done": True}
        else:
            reply = {"choices": [{"message": {"role": "assistant", "content": text}}]}
        data = json.dumps(reply).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


@pytest.fixture()
def fake_llm() -> Iterator[str]:
    _FakeLLM.calls = []
    _FakeLLM.fail_after = None
    server = ThreadingHTTPServer(("127.0.0.1", 0), _FakeLLM)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.mark.parametrize("api", ["ollama", "openai"])
def test_llm_rewrites_through_the_judge_client_are_cached_and_resume(
    fake_llm: str, tmp_path: Path, api: str
) -> None:
    if api == "ollama":
        client = ollama_client("llama3", base_url=fake_llm, retries=0)
    else:
        client = openai_client(fake_llm, "some-model", retries=0, max_tokens=512)
    entries = [_entry(i) for i in range(6)]
    cache = tmp_path / "rewrites.jsonl"

    # The server stops after 3 answers: the run fails, the first 3 rewrites are kept.
    _FakeLLM.fail_after = 3
    with pytest.raises(Exception, match="HTTP 400"):
        generate_preferences(entries, client, cache_path=cache, progress=False)
    assert len(read_rewrite_cache(cache)) == 3
    # Simulate a line cut short by a crash: it is skipped, the rest stays readable.
    with cache.open("a") as f:
        f.write('{"key": "half')

    _FakeLLM.fail_after = None
    pairs = generate_preferences(entries, client, cache_path=cache, progress=False)
    assert len(_FakeLLM.calls) == 6  # 3 before the failure, only the 3 missing ones after
    assert len(read_rewrite_cache(cache)) == 6
    for entry, pair in zip(entries, pairs, strict=True):
        assert pair["generator"] == f"llm:{client.model}"
        if pair["politeness"] == "polite":
            assert (pair["chosen"], pair["rejected"]) == (
                f"POLITE: {entry['output']}",
                entry["output"],
            )
        else:
            assert (pair["chosen"], pair["rejected"]) == (
                entry["output"],
                f"RUDE: {entry['output']}",
            )

    # A third run asks nothing: every rewrite comes from the cache.
    again = generate_preferences(entries, client, cache_path=cache, progress=False)
    assert again == pairs and len(_FakeLLM.calls) == 6
    save_preferences(pairs, tmp_path / "prefs.json")
    assert load_preferences(tmp_path / "prefs.json") == pairs


def test_empty_rewrites_are_left_out_with_a_warning(tmp_path: Path) -> None:
    class Blank:
        model = "blank"

        def chat(self, prompt: str) -> str:
            return "  " if "Say 1." in prompt else "fine"

    cache = tmp_path / "c.jsonl"
    with pytest.warns(UserWarning, match=r"1 empty rewrite\(s\) left out \(entries 1\)"):
        pairs = generate_preferences(
            [_entry(i) for i in range(3)], Blank(), cache_path=cache, progress=False
        )
    assert [p["instruction"] for p in pairs] == ["Say 0.", "Say 2."]
    assert len(read_rewrite_cache(cache)) == 2  # the empty one is asked again next time


def test_politeness_choice_depends_on_the_entry_not_its_position() -> None:
    e = _entry(5)
    assert choose_politeness(e) == choose_politeness(dict(e))
    assert choose_politeness(e) in ("polite", "impolite")


def test_command_line_offline_and_against_a_server(
    fake_llm: str, chapter_data_path: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from helpers.dpo.generate_pairs import main

    out = tmp_path / "pairs.json"
    args = ["--data", str(chapter_data_path), "--limit", "4", "--output", str(out), "--quiet"]
    assert main([*args, "--offline"]) == 0
    assert "4 pairs (rule-based (synthetic))" in capsys.readouterr().out
    assert all(p["generator"] == RULE_BASED for p in load_preferences(out))

    server = [
        "--api",
        "openai",
        "--url",
        fake_llm,
        "--llm",
        "m",
        "--cache",
        str(tmp_path / "c.jsonl"),
    ]
    assert main([*args, *server]) == 0
    assert "4 pairs (llm:m)" in capsys.readouterr().out
    assert len(_FakeLLM.calls) == 4 and len(read_rewrite_cache(tmp_path / "c.jsonl")) == 4

    # No server there: one line, exit code 2.
    assert main([*args, "--url", "http://127.0.0.1:9"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err


# --- pairs that teach nothing, and the command line's bad paths ----------------------------


def test_identical_chosen_and_rejected_is_refused_naming_the_entry(tmp_path: Path) -> None:
    from helpers.dpo.preferences import IdenticalPreferenceError

    pairs = [_pair(0), _pair(1), _entry(2, chosen="Same answer.", rejected=" Same answer.\n")]
    with pytest.raises(
        IdenticalPreferenceError, match=r"x\.json: entry 2: 'chosen' and 'rejected'"
    ):
        validate_preferences(pairs, "x.json")
    path = tmp_path / "prefs.json"
    path.write_text(json.dumps(pairs))
    with pytest.raises(IdenticalPreferenceError, match=r"prefs\.json: entry 2"):
        load_preferences(path)
    with pytest.raises(IdenticalPreferenceError):
        save_preferences(pairs, tmp_path / "out.json")
    assert not (tmp_path / "out.json").exists()
    assert len(validate_preferences(pairs, "x.json", allow_identical=True)) == 3


def test_the_books_own_identical_pairs_are_kept(preference_path: Path, tmp_path: Path) -> None:
    # The book's file has six such pairs; they stay, so its splits and losses stay the book's.
    from helpers.dpo.preferences import BOOK_IDENTICAL_PAIRS

    entries = load_preferences(preference_path)
    same = [i for i, e in enumerate(entries) if e["chosen"].strip() == e["rejected"].strip()]
    assert same == list(BOOK_IDENTICAL_PAIRS)
    edited = tmp_path / "edited.json"  # any other file with such pairs is refused
    edited.write_text(json.dumps(entries[:200]))
    with pytest.raises(PreferenceDataError, match=r"edited\.json: entry 122"):
        load_preferences(edited)


@pytest.mark.parametrize("limit", ["-1", "0", "x"])
def test_generate_pairs_rejects_a_non_positive_limit(
    chapter_data_path: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], limit: str
) -> None:
    from helpers.dpo.generate_pairs import main

    out = tmp_path / "pairs.json"
    with pytest.raises(SystemExit) as info:
        main(
            ["--data", str(chapter_data_path), "--offline", "--limit", limit, "--output", str(out)]
        )
    assert info.value.code == 2 and "argument --limit" in capsys.readouterr().err
    assert not out.exists()


def test_generate_pairs_bad_output_and_cache_paths_are_one_line(
    chapter_data_path: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from helpers.dpo.generate_pairs import main

    folder = tmp_path / "a-folder"
    folder.mkdir()
    garbage = tmp_path / "garbage.jsonl"
    garbage.write_bytes(bytes(range(128, 256)) * 8)
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    good = str(tmp_path / "pairs.json")
    cases = {
        (str(folder),): str(folder),
        (good, "--cache", str(folder)): str(folder),
        (good, "--cache", str(garbage)): str(garbage),
        (str(a_file / "pairs.json"),): str(a_file / "pairs.json"),
        ("bad\x00name.json",): "bad",
    }
    for (output, *extra), named in cases.items():
        args = ["--data", str(chapter_data_path), "--offline", "--quiet", "--limit", "3"]
        assert main([*args, "--output", output, *extra]) == 2, (output, extra)
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and "\n" not in err and named in err, err
        assert "--output" in err or "--cache" in err, err
    assert not (tmp_path / "pairs.json").exists()
    assert garbage.read_bytes() == bytes(range(128, 256)) * 8  # left as it was


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root writes anywhere")
def test_generate_pairs_read_only_folder_is_found_before_any_work(
    chapter_data_path: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from helpers.dpo.generate_pairs import main

    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        args = ["--data", str(chapter_data_path), "--offline", "--quiet", "--limit", "3"]
        assert main([*args, "--output", str(locked / "pairs.json")]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: --output") and "not writable" in err
    finally:
        locked.chmod(0o755)
