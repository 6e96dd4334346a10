"""Review table, rating widget (driven through its buttons), resume, merge and agreement."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from helpers.review.compare import (
    ReviewTool,
    format_review_text,
    review_frame,
    review_in_terminal,
    review_table,
)
from helpers.review.ratings import RatingStore, agreement, cohen_kappa, merge_reviews
from helpers.review.responses import entry_id
from helpers.widgets.live import WIDGET_VIEW
from tests.widgets.fakes import capture_displays


@pytest.fixture(scope="module")
def entries(responses_path: Path) -> list[dict[str, Any]]:
    return json.loads(responses_path.read_text())


def test_review_frame_and_differs_filter(entries: list[dict[str, Any]]) -> None:
    df = review_frame(entries)
    assert list(df.columns) == ["instruction", "input", "expected", "response", "differs"]
    assert len(df) == 110
    # Entry 0 ("... as a bullet." vs "... as lightning.") differs; some answers match exactly.
    assert bool(df.loc[0, "differs"]) is True
    same = df[~df["differs"]]
    assert len(same) > 0
    assert all(
        r.expected.lower().strip(" .") == r.response.lower().strip(" .") for r in same.itertuples()
    )
    only = review_frame(entries, only_differs=True)
    assert len(only) == 110 - len(same) and only["differs"].all()


def test_styled_table_and_text_fallback(entries: list[dict[str, Any]]) -> None:
    html = review_table(entries, limit=3).to_html()
    assert "The car is as fast as a bullet." in html and "#fff3cd" in html
    text = format_review_text(entries, limit=2)
    assert text.startswith("[0] DIFFERS")
    assert "response: The car is as fast as a bullet." in text
    assert "[1]" in text and "[2]" not in text


def test_widget_saves_each_rating_and_resumes(
    entries: list[dict[str, Any]], tmp_path: Path
) -> None:
    path = tmp_path / "alice.jsonl"
    tool = ReviewTool(entries[:5], path, reviewer="alice")
    assert tool.index == 0 and "The car is as fast as a bullet." in tool.html()
    tool.buttons["save"].click()  # nothing chosen yet: nothing saved
    assert not path.exists() and "Pick a rating" in tool.status.value
    tool.rating.value, tool.note.value = "partly", "lightning, not a bullet"
    tool.buttons["save"].click()
    lines = path.read_text().splitlines()
    assert len(lines) == 1  # on disk right after the click
    assert json.loads(lines[0])["rating"] == "partly" and tool.index == 1
    tool.buttons["next"].click()  # skip entry 1
    tool.rating.value = "correct"
    tool.buttons["save"].click()
    assert tool.index == 3
    # Re-opening resumes at the first unrated answer (the skipped one) and shows old ratings.
    again = ReviewTool(entries[:5], path, reviewer="alice")
    assert again.index == 1
    again.buttons["prev"].click()
    assert again.rating.value == "partly" and again.note.value == "lightning, not a bullet"


def test_static_view_of_the_entry_progress_and_rating(
    entries: list[dict[str, Any]], tmp_path: Path
) -> None:
    tool = ReviewTool(entries[:2], tmp_path / "bob.jsonl", reviewer="bob")
    text, page = tool.text(), tool.html()
    assert "VBox" not in text and "VBox" not in page
    assert text.startswith("0/2 rated · reviewer bob\nEntry 0\n")
    assert "Model response: The car is as fast as a bullet." in text
    assert text.endswith("Rating (correct / partly / wrong): not rated yet")
    assert all(len(line) <= 100 for line in text.splitlines())
    assert "The car is as fast as a bullet." in page and "<table style='width:100%;" in page
    # Long answers wrap inside the output area instead of widening it.
    assert "white-space:pre-wrap;overflow-wrap:anywhere" in page
    tool.rating.value, tool.note.value = "partly", "a bullet, <not> lightning"
    tool.buttons["save"].click()
    tool.buttons["prev"].click()
    assert tool.text().endswith("partly (a bullet, <not> lightning)")
    assert "a bullet, &lt;not&gt; lightning" in tool.html()  # escaped
    tool.go(2)
    assert tool.text() == "1/2 rated · reviewer bob\nAll answers reviewed."
    assert "<table" not in tool.html() and "All answers reviewed." in tool.html()


def test_displayed_as_note_entry_and_controls_kept_in_step(
    entries: list[dict[str, Any]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    published = capture_displays(monkeypatch)
    tool = ReviewTool(entries[:2], tmp_path / "bob.jsonl", reviewer="bob")
    assert published == [], "nothing is shown before the tool is displayed"
    tool._ipython_display_()
    note, entry, controls = published
    assert note.bundle["text/plain"].startswith("Live widget: the rating buttons respond once")
    assert entry.bundle == {"text/html": tool.html(), "text/plain": tool.text()}
    assert entry.display_id and not entry.update
    # The controls' own fallback (front ends without widgets, no saved state) is a text line
    # that the entry shows too, never the raw VBox(children=(... repr.
    assert controls.bundle["text/plain"] == "Rating (correct / partly / wrong): not rated yet"
    assert controls.bundle["text/plain"] in tool.text()
    assert controls.bundle[WIDGET_VIEW]["model_id"] == tool.widget.model_id
    # Each click rewrites the entry's output in place (same display id).
    tool.rating.value = "correct"
    tool.buttons["save"].click()
    update = published[-1]
    assert len(published) == 4 and update.update and update.display_id == entry.display_id
    assert update.bundle["text/plain"].startswith("1/2 rated · reviewer bob\nEntry 1\n")


def test_json_store_and_scale_validation(tmp_path: Path) -> None:
    store = RatingStore(tmp_path / "bob.json", reviewer="bob", scale="1-5")
    store.rate(0, 5)
    store.rate(2, "3", "ok")
    store.rate(0, "4")  # a second rating replaces the first
    doc = json.loads((tmp_path / "bob.json").read_text())
    assert doc["reviewer"] == "bob" and [r["rating"] for r in doc["ratings"]] == ["4", "3"]
    assert RatingStore(tmp_path / "bob.json", scale="1-5").first_unrated(3) == 1
    with pytest.raises(ValueError, match="not on the 1-5 scale"):
        store.rate(1, "correct")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"rating": "1"}\n')
    with pytest.raises(ValueError, match="bad.jsonl: record 0 lacks 'index'"):
        RatingStore(bad)


def test_terminal_fallback(
    entries: list[dict[str, Any]], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    answers = iter(["correct", "good", "wrong", "", ""])
    store = review_in_terminal(
        entries, tmp_path / "t.jsonl", input_fn=lambda _: next(answers), limit=5
    )
    assert {i: r["rating"] for i, r in store.ratings.items()} == {0: "correct", 1: "wrong"}
    assert "[1] " in capsys.readouterr().out


def test_cohen_kappa_hand_computed() -> None:
    a = ["correct", "correct", "wrong", "wrong", "partly", "correct"]
    b = ["correct", "wrong", "wrong", "wrong", "partly", "correct"]
    # p_o = 5/6; p_e = (3*2 + 2*3 + 1*1) / 36 = 13/36 -> kappa = (30/36 - 13/36) / (23/36) = 17/23
    assert cohen_kappa(a, b) == pytest.approx(17 / 23)
    assert cohen_kappa(a, a) == pytest.approx(1.0)
    assert cohen_kappa(["x", "y"], ["y", "x"]) == pytest.approx(-1.0)
    with pytest.raises(ValueError):
        cohen_kappa(["x"], [])


def test_merge_and_agreement(tmp_path: Path) -> None:
    ratings = {
        "ann": ["correct", "correct", "wrong", "wrong", "partly", "correct"],
        "ben": ["correct", "wrong", "wrong", "wrong", "partly", "correct"],
        "cy": ["correct", "correct"],
    }
    paths = []
    for name, rs in ratings.items():
        store = RatingStore(tmp_path / f"{name}.jsonl", reviewer=name)
        for i, r in enumerate(rs):
            store.rate(i, r)
        paths.append(store.path)
    merged = merge_reviews(paths)
    assert list(merged.columns) == ["ann", "ben", "cy"] and len(merged) == 6
    agree = agreement(merged).set_index(["rater_1", "rater_2"])
    assert agree.loc[("ann", "ben"), "percent_agreement"] == pytest.approx(500 / 6)
    assert agree.loc[("ann", "ben"), "cohen_kappa"] == pytest.approx(17 / 23)
    assert agree.loc[("ben", "cy"), "n_both"] == 2
    assert agree.loc[("ben", "cy"), "percent_agreement"] == pytest.approx(50.0)


def test_ratings_of_changed_answers_do_not_count_but_are_kept(tmp_path: Path) -> None:
    entries = [
        {"instruction": f"Q{i}", "input": "", "output": f"A{i}", "model_response": f"R{i}"}
        for i in range(3)
    ]
    path = tmp_path / "me.jsonl"
    store = RatingStore(path, entries=entries)
    for i, e in enumerate(entries):
        store.rate(i, "correct", entry_key=entry_id(e))
    assert RatingStore(path, entries=entries).first_unrated(3) == 3

    changed = [dict(e) for e in entries]
    changed[1]["model_response"] = "a regenerated answer"
    with pytest.warns(UserWarning, match="1 rating"):
        reopened = RatingStore(path, entries=changed)
    assert reopened.first_unrated(3) == 1
    assert set(reopened.ratings) == {0, 2} and set(reopened.stale) == {1}
    reopened.rate(0, "wrong", entry_key=entry_id(changed[0]))  # saving keeps the stale record
    with pytest.warns(UserWarning):
        assert set(RatingStore(path, entries=changed).stale) == {1}
    reopened.rate(1, "partly", entry_key=entry_id(changed[1]))
    assert RatingStore(path, entries=changed).first_unrated(3) == 3


_RATE_40 = """
import sys
from helpers.review.ratings import RatingStore
path, reviewer, start = sys.argv[1], sys.argv[2], int(sys.argv[3])
store = RatingStore(path, reviewer=reviewer)
sys.stdout.write("ready\\n"); sys.stdout.flush(); sys.stdin.readline()
for i in range(start, start + 40):
    store.rate(i, "correct" if i % 2 else "wrong", f"note {i}")
"""


@pytest.mark.parametrize("suffix", [".jsonl", ".json"])
def test_two_processes_rating_one_file_lose_nothing(tmp_path: Path, suffix: str) -> None:
    import subprocess
    import sys

    path = tmp_path / f"shared{suffix}"
    # Two reviewers on the same entries, and one reviewer from two tools on different entries.
    jobs = [("ann", 0), ("ben", 0), ("cy", 0), ("cy", 40)]
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _RATE_40, str(path), name, str(start)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        for name, start in jobs
    ]
    for p in procs:  # all started and holding a store: then let them rate at once
        assert p.stdout is not None and p.stdout.readline().strip() == "ready"
    for p in procs:
        assert p.stdin is not None
        p.stdin.write("go\n")
        p.stdin.flush()
    for p in procs:
        assert p.stdin is not None
        p.stdin.close()
        assert p.wait(timeout=120) == 0
    merged = merge_reviews([path])
    assert list(merged.columns) == ["ann", "ben", "cy"]
    assert merged["ann"].count() == 40 and merged["ben"].count() == 40
    assert merged["cy"].count() == 80
    cy = RatingStore(path, reviewer="cy")
    assert cy.first_unrated(80) == 80 and cy.ratings[41]["note"] == "note 41"


def test_each_rating_keeps_its_reviewer(tmp_path: Path) -> None:
    path = tmp_path / "alice.jsonl"
    RatingStore(path, reviewer="alice").rate(0, "correct")
    assert RatingStore(path).reviewer == "alice"  # the file's only reviewer, when none is given
    bob = RatingStore(path, reviewer="bob")  # bob rates in alice's file
    assert bob.ratings == {} and bob.first_unrated(2) == 0
    bob.rate(0, "wrong")
    recs = [json.loads(line) for line in path.read_text().splitlines()]
    assert {(r["reviewer"], r["rating"]) for r in recs} == {("alice", "correct"), ("bob", "wrong")}
    assert RatingStore(path, reviewer="alice").ratings[0]["rating"] == "correct"
    assert merge_reviews([path]).loc[0].to_dict() == {"alice": "correct", "bob": "wrong"}


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('{"ratings": 5}', "field 'ratings' must be a list, found int"),
        ("null", r"expected \{'ratings': \[...\]\} or a list, found NoneType"),
        ("[5]", "record 0 lacks 'index' or 'rating'"),
        ('[{"index": -1, "rating": "correct"}]', "record 0: index -1 must be a whole number >= 0"),
        ('[{"index": "2", "rating": "correct"}]', "record 0: index '2' must be a whole number"),
        ('[{"index": 0, "rating": "great"}]', "record 0: rating 'great' not on the 3-level scale"),
        (
            '[{"index": 0, "rating": "7", "scale": "1-5"}]',
            "record 0: rated on the '1-5' scale, not '3-level'",
        ),
    ],
)
def test_malformed_review_files_give_one_clear_error(
    tmp_path: Path, text: str, message: str
) -> None:
    path = tmp_path / "bad.json"
    path.write_text(text)
    with pytest.raises(ValueError, match=message) as err:
        RatingStore(path)
    assert str(err.value).startswith("bad.json: ") and "\n" not in str(err.value)


def test_off_scale_rating_in_a_file_is_rejected_also_when_merging(tmp_path: Path) -> None:
    path = tmp_path / "r.jsonl"
    path.write_text('{"index": 0, "rating": "7", "scale": "1-5", "reviewer": "x"}\n')
    with pytest.raises(ValueError, match=r"r\.jsonl: record 0: rating '7' not on the 1-5 scale"):
        merge_reviews([path])


def test_rate_rejects_negative_and_out_of_range_indices(tmp_path: Path) -> None:
    entries = [{"instruction": "Q", "input": "", "output": "A", "model_response": "R"}]
    store = RatingStore(tmp_path / "r.jsonl", entries=entries)
    with pytest.raises(ValueError, match="index -1 must be a whole number >= 0"):
        store.rate(-1, "correct")
    with pytest.raises(ValueError, match="index 1 is past the last of the 1 entries"):
        store.rate(1, "correct")
    rec = store.rate(0, "partly")
    assert rec["entry_id"] == entry_id(entries[0])  # filled in from the entries it knows
