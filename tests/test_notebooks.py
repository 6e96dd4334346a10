"""The committed notebooks render everywhere: JupyterLab (trusted or not), nbconvert HTML, GitHub.

Reads the saved .ipynb files only (no kernel); one check exports them to HTML with nbconvert. `make notebooks` re-runs them and then runs this.
Each check lists every offending output as "<notebook> cell <index> (<first source line>): ...",
the cell index counting all cells from 0, as nbformat and JupyterLab's cell list do.
"""

from __future__ import annotations

import html
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))
WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"
WIDGET_STATE = "application/vnd.jupyter.widget-state+json"

# What a widget prints when nothing better is there: `repr(widget)`.
RAW_WIDGET_REPR = re.compile(
    r"\b(?:HBox|VBox|GridBox|Box|Tab|Accordion|Stack)\(children="
    r"|\b(?:IntProgress|FloatProgress|IntSlider|FloatSlider|Dropdown|Textarea)\("
    r"|\b(?:Label|HTML|Text|Button)\((?:value|description)="
    r"|\bOutput\(\)"
)
MACHINE_PATH = re.compile(r"/work/|/home/|/root/|/tmp/|/Users/|[A-Za-z]:\\\\?Users\\", re.I)
NBVAL_COMMENT = re.compile(r"\s*#\s*NBVAL_", re.I)
FROZEN_BAR = re.compile(r"\b0%\|")
# The one-line note above each widget (helpers.widgets.live): it responds once the cell has run.
LIVE_NOTE = "Live widget:"
# Output data that is not text a reader sees (images are base64, where "/tmp/" can occur).
BINARY_PREFIXES = ("image/", "application/pdf", WIDGET_VIEW)


def _load(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8"))


def _text(value: Any) -> str:
    return "".join(value) if isinstance(value, list) else str(value)


def _where(path: Path, index: int, cell: dict[str, Any]) -> str:
    first = _text(cell.get("source", "")).strip().splitlines()
    head = (first[0][:40] + "…" if len(first[0]) > 40 else first[0]) if first else ""
    return f"{path.name} cell {index} ({head!r})"


def _code_cells(nb: dict[str, Any]) -> Iterator[tuple[int, dict[str, Any]]]:
    for index, cell in enumerate(nb.get("cells", [])):
        if cell.get("cell_type") == "code":
            yield index, cell


def _outputs(nb: dict[str, Any]) -> Iterator[tuple[int, dict[str, Any], dict[str, Any]]]:
    for index, cell in _code_cells(nb):
        for output in cell.get("outputs", []):
            yield index, cell, output


def _widget_state(nb: dict[str, Any]) -> dict[str, Any] | None:
    """The saved widget models by id, or None when the notebook saved no widget state."""
    widgets = nb.get("metadata", {}).get("widgets", {})
    saved = widgets.get(WIDGET_STATE) if isinstance(widgets, dict) else None
    return saved.get("state", {}) if isinstance(saved, dict) else None


def _visible_texts(output: dict[str, Any]) -> Iterator[tuple[str, str]]:
    """(kind, text) for every text in an output a reader can see."""
    if output.get("output_type") == "stream":
        yield f"{output.get('name', 'stream')} stream", _text(output.get("text", ""))
    elif output.get("output_type") == "error":
        yield "error", "\n".join([output.get("evalue", ""), *output.get("traceback", [])])
    for mime, value in output.get("data", {}).items():
        if not mime.startswith(BINARY_PREFIXES):
            yield mime, value if isinstance(value, str) else _text(value)


def _state_strings(value: Any) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for key, item in value.items():
            if key != "buffers":
                yield from _state_strings(item)
    elif isinstance(value, list):
        for item in value:
            yield from _state_strings(item)


def _fail(problems: list[str], what: str) -> None:
    if problems:
        pytest.fail(f"{len(problems)} {what}:\n" + "\n".join(problems), pytrace=False)


notebooks = pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])


@notebooks
def test_widget_views_have_saved_state_or_a_static_fallback(path: Path) -> None:
    nb = _load(path)
    state = _widget_state(nb)
    problems = []
    for index, cell, output in _outputs(nb):
        view = output.get("data", {}).get(WIDGET_VIEW)
        if view is None:
            continue
        model = view.get("model_id", "") if isinstance(view, dict) else ""
        if state is not None:
            if model not in state:
                problems.append(
                    f"{_where(path, index, cell)}: widget view {model!r} has no model in the "
                    "saved widget state (run with --ExecutePreprocessor.store_widget_state=True)"
                )
            continue
        data = output["data"]
        fallback = _text(data.get("text/html", "")) or _text(data.get("text/plain", ""))
        if not fallback.strip() or RAW_WIDGET_REPR.search(fallback):
            problems.append(
                f"{_where(path, index, cell)}: widget view {model!r} with no saved widget state "
                f"and no static fallback (text/plain or text/html); it shows {fallback[:60]!r}"
            )
    _fail(problems, "widget outputs that render as nothing outside a live kernel")


@notebooks
def test_outputs_show_no_machine_paths(path: Path) -> None:
    nb = _load(path)
    problems = []
    for index, cell, output in _outputs(nb):
        for kind, text in _visible_texts(output):
            found = MACHINE_PATH.search(text)
            if found:
                start = max(found.start() - 30, 0)
                problems.append(
                    f"{_where(path, index, cell)}: machine path in {kind}: "
                    f"{text[start : found.end() + 40]!r} (print paths relative to the repository)"
                )
    for model, saved in (_widget_state(nb) or {}).items():
        for text in _state_strings(saved):
            if MACHINE_PATH.search(text):
                problems.append(f"{path.name} widget state {model}: machine path in {text[:80]!r}")
    _fail(problems, "machine paths")


@notebooks
def test_no_error_outputs(path: Path) -> None:
    nb = _load(path)
    problems = [
        f"{_where(path, index, cell)}: error output {output.get('ename')}: "
        f"{_text(output.get('evalue', ''))[:100]}"
        for index, cell, output in _outputs(nb)
        if output.get("output_type") == "error"
    ]
    _fail(problems, "error outputs")


@notebooks
def test_no_stderr_outputs(path: Path) -> None:
    nb = _load(path)
    problems = [
        f"{_where(path, index, cell)}: stderr output {_text(output.get('text', ''))[:100]!r}"
        for index, cell, output in _outputs(nb)
        if output.get("output_type") == "stream" and output.get("name") == "stderr"
    ]
    _fail(problems, "stderr outputs (warnings, logs, text progress bars)")


@notebooks
def test_nbval_markers_are_tags_not_comments(path: Path) -> None:
    nb = _load(path)
    problems = []
    for index, cell in _code_cells(nb):
        source = _text(cell.get("source", "")).splitlines()
        for line in filter(NBVAL_COMMENT.match, source):
            problems.append(
                f"{_where(path, index, cell)}: source comment {line.strip()!r}; use the cell "
                "metadata tag (nbval-check-output, nbval-skip)"
            )
    _fail(problems, "nbval comment lines")


@notebooks
def test_one_clean_top_to_bottom_run(path: Path) -> None:
    nb = _load(path)
    problems = []
    expected = 1
    for index, cell in _code_cells(nb):
        count = cell.get("execution_count")
        tags = cell.get("metadata", {}).get("tags", [])
        if not _text(cell.get("source", "")).strip() or "skip-execution" in tags:
            continue  # cells nbconvert does not run
        if count is None:
            problems.append(f"{_where(path, index, cell)}: not executed")
            continue
        if count != expected:
            problems.append(
                f"{_where(path, index, cell)}: execution count {count}, expected {expected}"
            )
        expected = count + 1
    _fail(problems, "cells out of one top-to-bottom run (re-run the notebook: make notebooks)")


@notebooks
def test_no_raw_widget_reprs(path: Path) -> None:
    nb = _load(path)
    problems = []
    for index, cell, output in _outputs(nb):
        plain = _text(output.get("data", {}).get("text/plain", ""))
        found = RAW_WIDGET_REPR.search(plain)
        if found:
            problems.append(
                f"{_where(path, index, cell)}: text/plain is a raw widget repr "
                f"{plain[found.start() : found.start() + 60]!r}; give the widget a "
                "_repr_mimebundle_ fallback that shows its content"
            )
    _fail(problems, "raw widget reprs")


@notebooks
def test_progress_bars_are_saved_in_their_final_state(path: Path) -> None:
    nb = _load(path)
    problems = []
    for index, cell, output in _outputs(nb):
        data = output.get("data", {})
        plain = _text(data.get("text/plain", ""))
        if WIDGET_VIEW in data and FROZEN_BAR.search(plain):
            problems.append(
                f"{_where(path, index, cell)}: progress bar saved at its first frame "
                f"{plain.strip()[:70]!r}; use `from helpers.widgets.progress import tqdm`"
            )
    _fail(problems, "progress bars frozen at 0%")


def _visible(page: str) -> str:
    """What a reader sees of an HTML fragment without JavaScript: no scripts, tags or styles."""
    page = re.sub(r"<(script|style)\b.*?</\1>", " ", page, flags=re.S | re.I)
    return _squash(re.sub(r"<[^>]+>", " ", page))


def _squash(text: str) -> str:
    return " ".join(html.unescape(text).split())


def exported_outputs(path: Path) -> list[str]:
    """Visible text of each code cell's outputs in nbconvert's HTML export, in cell order."""
    from nbconvert import HTMLExporter

    page, _ = HTMLExporter().from_filename(str(path))
    cells = re.split(r'class="jp-Cell ', page)[1:]
    outputs = [re.split(r"jp-Cell-outputWrapper[^>]*>", c, maxsplit=1) for c in cells]
    return [
        _visible(parts[1] if len(parts) == 2 else "")
        for cell, parts in zip(cells, outputs, strict=True)
        if cell.startswith("jp-CodeCell")
    ]


def widget_fallback_problems(path: Path) -> list[str]:
    """Widgets whose text fallback or live note an HTML export (no JavaScript) does not show.

    Where the notebook saved its widget state, nbconvert draws a widget view with JavaScript
    only and drops the text beside it, so the fallback must be shown by another output of the
    same cell (helpers.widgets.live's plain view); the "Live widget: ..." note too.
    """
    nb = _load(path)
    code = list(_code_cells(nb))
    shown = exported_outputs(path)
    if len(shown) != len(code):
        return [f"{path.name}: the HTML export has {len(shown)} code cells, not {len(code)}"]
    problems = []
    for (index, cell), visible in zip(code, shown, strict=True):
        views = [o["data"] for o in cell.get("outputs", []) if WIDGET_VIEW in o.get("data", {})]
        for data in views:
            lines = [_squash(line) for line in _text(data.get("text/plain", "")).splitlines()]
            missing = [line for line in lines if line and line not in visible]
            if not any(lines):
                problems.append(f"{_where(path, index, cell)}: widget view without a text fallback")
            elif missing:
                problems.append(
                    f"{_where(path, index, cell)}: the HTML export does not show the widget's "
                    f"fallback {missing[0][:70]!r} ({len(missing)} of {len(lines)} lines); show "
                    "its content as a plain output too (helpers.widgets.live)"
                )
        if views and LIVE_NOTE not in visible:
            problems.append(
                f"{_where(path, index, cell)}: the HTML export shows no {LIVE_NOTE!r} note "
                "saying the widget responds once the cell has run"
            )
    return problems


@notebooks
def test_html_export_shows_each_widgets_fallback(path: Path) -> None:
    _fail(widget_fallback_problems(path), "widgets that an HTML export shows as an empty output")


@notebooks
def test_each_widget_has_a_live_note_above_it(path: Path) -> None:
    nb = _load(path)
    problems = []
    for index, cell in _code_cells(nb):
        noted = False
        for output in cell.get("outputs", []):
            data = output.get("data", {})
            if _text(data.get("text/plain", "")).startswith(LIVE_NOTE):
                noted = True
            elif WIDGET_VIEW in data and not noted:
                problems.append(
                    f"{_where(path, index, cell)}: widget without a {LIVE_NOTE!r} note above it "
                    "(helpers.widgets.live.note_output)"
                )
    _fail(problems, "widgets that do not say they respond only after the cell has run")


CHECKS = [
    test_widget_views_have_saved_state_or_a_static_fallback,
    test_outputs_show_no_machine_paths,
    test_no_error_outputs,
    test_no_stderr_outputs,
    test_nbval_markers_are_tags_not_comments,
    test_one_clean_top_to_bottom_run,
    test_no_raw_widget_reprs,
    test_progress_bars_are_saved_in_their_final_state,
    test_html_export_shows_each_widgets_fallback,
    test_each_widget_has_a_live_note_above_it,
]


def _cell(source: str, count: int | None, *outputs: dict[str, Any]) -> dict[str, Any]:
    return {
        "cell_type": "code",
        "source": source,
        "metadata": {},
        "execution_count": count,
        "outputs": list(outputs),
    }


def _display(**data: Any) -> dict[str, Any]:
    return {"output_type": "display_data", "metadata": {}, "data": data}


def _view(model: str) -> dict[str, Any]:
    return {"version_major": 2, "version_minor": 0, "model_id": model}


def _write(tmp_path: Path, cells: list[dict[str, Any]], state: dict[str, Any] | None) -> Path:
    metadata = {"widgets": {WIDGET_STATE: {"state": state}}} if state is not None else {}
    path = tmp_path / "nb.ipynb"
    cells = [{"id": f"cell-{i}", **cell} for i, cell in enumerate(cells)]
    nb = {"cells": cells, "metadata": metadata, "nbformat": 4, "nbformat_minor": 5}
    path.write_text(json.dumps(nb), encoding="utf-8")
    return path


def _live_widget(model: str, *, note: bool = True, view: bool = True) -> list[dict[str, Any]]:
    """A widget's outputs as helpers.widgets.live shows them: note, controls, plain view."""
    settings = "example 0 of 5 · style alpaca"
    outputs = [_display(**{"text/plain": settings, WIDGET_VIEW: _view(model)})]
    if note:
        text = f"{LIVE_NOTE} the controls respond once you run this cell"
        outputs.insert(0, _display(**{"text/plain": text, "text/html": f"<p>{text}</p>"}))
    if view:
        table = "<table><tr><td>pos</td><td>token</td></tr></table>"
        outputs.append(_display(**{"text/plain": "…", "text/html": f"<p>{settings}</p>{table}"}))
    return outputs


def test_the_checks_pass_a_clean_notebook(tmp_path: Path) -> None:
    bar = "fine-tuning: 100%|██████████| 24/24 [00:41<00:00,  1.71step/s]"
    cells = [
        {"cell_type": "markdown", "source": "# 0N · Title", "metadata": {}},
        _cell(
            "print('runs/tiny/model.pt')",
            1,
            {"output_type": "stream", "name": "stdout", "text": "runs/tiny/model.pt\n"},
        ),
        _cell("", None),
        _cell("train()", 2, _display(**{"text/plain": bar, "text/html": f"<div>{bar}</div>"})),
        _cell("inspector", 3, *_live_widget("m2")),
    ]
    path = _write(tmp_path, cells, {"m1": {"state": {"value": "fine-tuning: 100%"}}, "m2": {}})
    for check in CHECKS:
        check(path)


@pytest.mark.parametrize(
    ("check", "cell", "state"),
    [
        (CHECKS[0], _cell("w", 1, _display(**{"text/plain": "x", WIDGET_VIEW: _view("m")})), {}),
        (
            CHECKS[0],
            _cell("w", 1, _display(**{"text/plain": "VBox(children=(", WIDGET_VIEW: _view("m")})),
            None,
        ),
        (
            CHECKS[1],
            _cell("p", 1, {"output_type": "stream", "name": "stdout", "text": "/home/me/x"}),
            None,
        ),
        (CHECKS[1], _cell("p", 1, _display(**{"text/html": "<b>C:\\Users\\me</b>"})), None),
        (CHECKS[1], _cell("p", 1), {"m": {"state": {"value": "saved to /tmp/x"}}}),
        (
            CHECKS[2],
            _cell("e", 1, {"output_type": "error", "ename": "E", "evalue": "", "traceback": []}),
            None,
        ),
        (
            CHECKS[3],
            _cell("s", 1, {"output_type": "stream", "name": "stderr", "text": "warn"}),
            None,
        ),
        (CHECKS[4], _cell("# NBVAL_SKIP\nx = 1", 1), None),
        (CHECKS[5], _cell("x", None), None),
        (CHECKS[5], _cell("x", 2), None),
        (
            CHECKS[6],
            _cell("w", 1, _display(**{"text/plain": "HBox(children=(HTML(value=''),))"})),
            None,
        ),
        (
            CHECKS[7],
            _cell(
                "b", 1, _display(**{"text/plain": "DPO:   0%|     | 0/12", WIDGET_VIEW: _view("m")})
            ),
            {"m": {}},
        ),
        # With saved state the export draws the view with JavaScript only: nothing else shows
        # the widget's fallback, or the note is missing.
        (CHECKS[8], _cell("w", 1, *_live_widget("m", view=False)), {"m": {}}),
        (CHECKS[8], _cell("w", 1, *_live_widget("m", note=False)), {"m": {}}),
        (CHECKS[8], _cell("w", 1, _display(**{"text/plain": "", WIDGET_VIEW: _view("m")})), None),
        (CHECKS[9], _cell("w", 1, *_live_widget("m", note=False)), {"m": {}}),
        (CHECKS[9], _cell("w", 1, *reversed(_live_widget("m"))), {"m": {}}),
    ],
)
def test_the_checks_catch_each_problem(
    tmp_path: Path, check: Any, cell: dict[str, Any], state: dict[str, Any] | None
) -> None:
    with pytest.raises(pytest.fail.Exception, match=r"nb\.ipynb"):
        check(_write(tmp_path, [cell], state))
