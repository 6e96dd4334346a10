"""helpers.widgets.live: a note, the controls, and a plain view that renders in any HTML export."""

from __future__ import annotations

import json
from pathlib import Path

from helpers.widgets.live import WIDGET_VIEW, PlainView, note_output, show, widget_output
from tests.widgets.fakes import Shown
from tests.widgets.kernel import execute_cells


def test_note_is_one_escaped_line() -> None:
    note = note_output("move the <slider> after running this cell.")
    assert note.display_id is None
    assert note.bundle["text/plain"] == "Live widget: move the <slider> after running this cell."
    assert "<b>Live widget:</b> move the &lt;slider&gt; after" in note.bundle["text/html"]
    assert "\n" not in note.bundle["text/plain"]


def test_widget_output_is_the_view_with_a_text_fallback() -> None:
    import ipywidgets

    slider = ipywidgets.IntSlider()
    out = widget_output(slider, "example 0 of 3")
    assert out.bundle == {
        WIDGET_VIEW: {"version_major": 2, "version_minor": 0, "model_id": slider.model_id},
        "text/plain": "example 0 of 3",
    }


def test_plain_view_is_shown_once_then_updated_in_place(published: list[Shown]) -> None:
    state = {"n": 0}
    view = PlainView(lambda: (f"<b>{state['n']}</b>", str(state["n"])))
    view.refresh()
    assert published == [], "nothing to update before the view is shown"
    show(note_output("x"), view)
    assert published[1] == Shown(
        {"text/html": "<b>0</b>", "text/plain": "0"}, view.display_id, False
    )
    state["n"] = 7
    view.refresh()
    assert published[2] == Shown(
        {"text/html": "<b>7</b>", "text/plain": "7"}, view.display_id, True
    )
    other = PlainView(view.render)
    assert other.display_id != view.display_id


def test_executed_notebook_passes_the_committed_notebook_checks(
    tmp_path: Path, chapter_data_path: Path, responses_path: Path
) -> None:
    """The inspector, the review tool and a bar, run as `make notebooks` runs the course's."""
    import tests.test_notebooks as checks

    reviews = tmp_path / "reviews"  # relative in the notebook: no machine path in the outputs
    reviews.mkdir()
    nb = execute_cells(
        [
            "import json\n"
            "from helpers.data import load_instruction_data, split_data\n"
            "from helpers.review.compare import ReviewTool\n"
            "from helpers.widgets.inspector import TokenInspector\n"
            "from helpers.widgets.progress import tqdm\n"
            f"validation = split_data(load_instruction_data({str(chapter_data_path)!r})).validation\n"
            f"entries = json.loads(open({str(responses_path)!r}).read())[:3]",
            "inspector = TokenInspector(validation, mask_prompt=True, extra_padding=2)\ninspector",
            "tool = ReviewTool(entries, 'reviews/me.jsonl', reviewer='me')\ntool",
            "for _ in tqdm(range(40), desc='fine-tuning', unit='step'):\n    pass",
        ],
        tmp_path,
    )
    assert nb.metadata["widgets"], "the widget state is saved"
    path = tmp_path / "executed.ipynb"
    path.write_text(json.dumps(nb), encoding="utf-8")
    for check in checks.CHECKS:
        check(path)
    shown = checks.exported_outputs(path)
    assert "example 0 of 55 · style alpaca · prompt masked · max len none · padding +2" in shown[1]
    assert "count in the loss" in shown[1] and "Live widget: the controls respond" in shown[1]
    assert "0/3 rated · reviewer me Entry 0" in shown[2] and "as fast as a bullet" in shown[2]
    assert shown[3].startswith("fine-tuning: 100% 40/40 [00:00<00:00, ")  # the bar in HTML
