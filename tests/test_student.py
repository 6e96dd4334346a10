"""The classroom editions, built and graded by nbgrader as a teacher would (notebooks/classroom.py).

1. The student edition of all seven notebooks (`make student`): every marked region is a stub
   with a one-line hint, every written answer a blank, no outputs, and no solution or hidden
   test text anywhere in it.
2. One grading run (`make grade`) over the untouched student edition of every notebook (which
   executes it: each check fails with its own message, never a NameError or a traceback into
   helpers/, and the run goes on past it), the instructor edition of 02 (full points) and 02
   with a wrong `custom_collate_fn` (only that part loses its points).
3. Bad submissions: not a notebook, another course's notebook, cells deleted or renamed, an
   endless loop: one line per problem, a score for what could be graded, no crash.

Slow (minutes: it executes every student notebook in tiny mode); skipped without nbgrader
except under CI=true, where it must run.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
CLASSROOM = ROOT / "notebooks" / "classroom.py"
SOURCES = sorted((ROOT / "notebooks").glob("0*.ipynb"))
NB02 = ROOT / "notebooks" / "02_batching_and_masking.ipynb"
NB01 = ROOT / "notebooks" / "01_dataset_formatting.ipynb"
REGION = re.compile(r"### BEGIN (SOLUTION|HIDDEN TESTS)\n(.*?)### END \1", re.S)
STUB = "raise NotImplementedError()"
# Solution text named in the course's issue: the collate function's `New` steps, the weight
# converter's W_query transposes, the LoRA forward, the DPO loss.
NAMED_SOLUTION_TEXT = [
    "# New: keep the first <|endoftext|> target",
    "targets[indices[1:]] = ignore_index",
    "inputs = inputs[:allowed_max_length]",
    "targets[row, : example.prompt_length - 1] = -100",
    "w.T.contiguous()  # Conv1D (in, out) -> Linear (out, in)",
    'book[f"{dst}att.{part}.weight"]',
    "return self.linear(x) + self.lora(x)",
    "self.alpha * (x @ self.A @ self.B)",
    "-F.logsigmoid(chosen_rewards - rejected_rewards)",
]


def _require_nbgrader() -> None:
    if importlib.util.find_spec("nbgrader") is not None:
        return
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail("CI=true but nbgrader is missing: pip install -e '.[dev]'")
    pytest.skip("needs nbgrader (the dev extra)")


def _classroom(*args: str | Path, timeout: int = 1800) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, COURSE_MODEL="tiny", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    return subprocess.run(
        [sys.executable, str(CLASSROOM), *map(str, args)],
        cwd=ROOT,
        env=env,
        text=True,
        capture_output=True,
        timeout=timeout,
        check=False,
    )


def _load(path: Path) -> dict[str, Any]:
    nb: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    return nb


def _results(path: Path) -> list[dict[str, Any]]:
    """What `classroom.py grade --json` wrote: one dict per submission."""
    results: list[dict[str, Any]] = json.loads(path.read_text(encoding="utf-8"))
    return results


def _source(cell: dict[str, Any]) -> str:
    source = cell.get("source", "")
    return "".join(source) if isinstance(source, list) else source


def _nbgrader(cell: dict[str, Any]) -> dict[str, Any]:
    meta = cell.get("metadata", {}).get("nbgrader", {})
    return meta if isinstance(meta, dict) else {}


def _solution_lines(nb: dict[str, Any]) -> set[str]:
    """Lines only the solutions and hidden tests hold (not also written elsewhere in the notebook)."""
    hidden, shown = [], []
    for cell in nb["cells"]:
        text = _source(cell)
        if _nbgrader(cell).get("solution") and "### BEGIN SOLUTION" not in text:
            hidden.append(text)  # a whole cell: a written answer
            continue
        hidden += [m.group(2) for m in REGION.finditer(text)]
        shown.append(REGION.sub("", text))
    elsewhere = "\n".join(shown)
    lines = {line.strip() for block in hidden for line in block.splitlines()}
    return {line for line in lines if len(line) >= 12 and line not in elsewhere}


@pytest.fixture(scope="module")
def student(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`make student` into a temporary folder."""
    _require_nbgrader()
    base = tmp_path_factory.mktemp("classroom")
    out = base / "student"
    done = _classroom("student", "--out", out, "--course-dir", base / "nbgrader", timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    return out


def test_the_student_edition_has_stubs_with_hints_and_no_solutions(student: Path) -> None:
    built = sorted(student.glob("*.ipynb"))
    assert [p.name for p in built] == [p.name for p in SOURCES]
    for source_path, path in zip(SOURCES, built, strict=True):
        source, nb = _load(source_path), _load(path)
        text = json.dumps(nb, ensure_ascii=False)
        for marker in ("BEGIN SOLUTION", "END SOLUTION", "HIDDEN TESTS"):
            assert marker not in text, f"{path.name}: {marker}"
        leaked = sorted(line for line in _solution_lines(source) if line in text)
        assert not leaked, f"{path.name}: solution text in the student edition: {leaked[:5]}"
        assert all(not c.get("outputs") for c in nb["cells"]), f"{path.name}: outputs left"
        solutions = [c for c in nb["cells"] if _nbgrader(c).get("solution")]
        assert solutions, f"{path.name}: nothing for the learner to write"
        for cell in solutions:
            lines = _source(cell).splitlines()
            if cell["cell_type"] == "markdown":
                assert _source(cell) == "YOUR ANSWER HERE", path.name
                continue
            stubs = [at for at, line in enumerate(lines) if line.strip() == STUB]
            assert stubs, f"{path.name}: a solution cell without a stub"
            for at in stubs:  # the line above nbgrader's "# YOUR CODE HERE" is the hint
                hint = lines[at - 2].strip()
                assert hint.startswith("# ") and len(hint) > 20, f"{path.name}: no hint at {at}"
    everything = "\n".join(p.read_text(encoding="utf-8") for p in built)
    for snippet in NAMED_SOLUTION_TEXT:
        assert json.dumps(snippet)[1:-1] not in everything, snippet
        # ... and the source holds each of them, so the check above means something.
        assert any(json.dumps(snippet)[1:-1] in p.read_text(encoding="utf-8") for p in SOURCES), (
            snippet
        )


def _wrong_collate(path: Path) -> Path:
    """Notebook 02 with the first `New` step off by one: every padding target becomes -100."""
    nb = _load(NB02)
    for cell in nb["cells"]:
        text = _source(cell)
        if text.startswith("def custom_collate_fn("):
            assert "targets[indices[1:]] = ignore_index" in text
            cell["source"] = text.replace(
                "targets[indices[1:]] = ignore_index", "targets[indices] = ignore_index"
            )
    path.write_text(json.dumps(nb), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def graded(student: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One `make grade` run over nine submissions; its JSON results, report and executed copies."""
    base = tmp_path_factory.mktemp("grading")
    submissions = [*sorted(student.glob("*.ipynb")), NB02, _wrong_collate(base / "wrong-02.ipynb")]
    keep = base / "autograded"
    done = _classroom("grade", *submissions, "--json", base / "results.json", "--keep", keep)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Traceback" not in done.stdout + done.stderr
    results = _results(base / "results.json")
    assert [r["submission"] for r in results] == [str(s) for s in submissions]
    return {"results": results, "report": done.stdout, "keep": keep}


def _points(result: dict[str, Any]) -> dict[str, tuple[float | None, float]]:
    return {p["name"]: (p["points"], p["max_points"]) for p in result["parts"] if not p["manual"]}


def test_the_untouched_student_edition_gets_zero_and_each_check_says_what_is_missing(
    graded: dict[str, Any], student: Path
) -> None:
    for k, result in enumerate(graded["results"][:7], start=1):
        name = result["notebook"]
        assert name == SOURCES[k - 1].stem and not result["problems"], result
        parts = [p for p in result["parts"] if not p["manual"]]
        assert parts and all(p["points"] == 0 for p in parts), (name, parts)
        assert f"Total: 0 / {sum(p['max_points'] for p in parts):g} points" in graded["report"]
        stubs = "\n".join(
            _source(c)
            for c in _load(student / f"{name}.ipynb")["cells"]
            if _nbgrader(c).get("solution")
        )
        for part in parts:
            message = part["message"]
            assert message.startswith("AssertionError: ") and "; see " in message, (name, part)
            subject = message.removeprefix("AssertionError: ").split(":")[0]
            assert subject in stubs, f"{name} {part['name']}: {subject!r} names no stub: {message}"
        # The run went on past every failing check: every code cell ran, in order.
        executed = _load(graded["keep"] / f"submission-{k:02d}" / "course" / f"{name}.ipynb")
        counts = [
            c["execution_count"]
            for c in executed["cells"]
            if c["cell_type"] == "code" and _source(c).strip()
        ]
        assert None not in counts and counts == sorted(counts), name
        for cell in executed["cells"]:
            for output in cell.get("outputs", []):
                if _nbgrader(cell).get("grade") and output.get("output_type") == "error":
                    assert "helpers/" not in "".join(output.get("traceback", [])), name
                    assert output["ename"] == "AssertionError", (name, output["ename"])
    for result in graded["results"][:7]:
        manual = [p for p in result["parts"] if p["manual"]]
        assert all(p["points"] == 0 and p["message"] == "written answer left empty" for p in manual)


def test_the_instructor_edition_gets_full_points(graded: dict[str, Any]) -> None:
    result = graded["results"][7]
    points = _points(result)
    assert len(points) >= 6 and all(got == full > 0 for got, full in points.values()), points
    manual = [p for p in result["parts"] if p["manual"]]
    assert manual and all(p["points"] is None for p in manual), manual  # left for the teacher
    assert "of written answers to grade by hand" in graded["report"]


def test_a_wrong_collate_function_loses_only_its_own_points(graded: dict[str, Any]) -> None:
    result = graded["results"][8]
    points = _points(result)
    collate = {k: v for k, v in points.items() if k.startswith("custom_collate_fn")}
    assert len(collate) == 2 and all(got == 0 for got, _ in collate.values()), collate
    rest = {k: v for k, v in points.items() if k not in collate}
    assert rest and all(got == full for got, full in rest.values()), rest
    messages = [p["message"] for p in result["parts"] if p["name"] in collate]
    assert all("custom_collate_fn:" in m and "write the two" not in m for m in messages), messages


def test_bad_submissions_get_one_line_per_problem_and_a_score(
    student: Path, tmp_path: Path
) -> None:
    not_a_notebook = tmp_path / "essay.ipynb"
    not_a_notebook.write_text("my answers are in the PDF", encoding="utf-8")
    foreign = tmp_path / "other-course.ipynb"
    foreign.write_text(
        json.dumps(
            {
                "cells": [
                    {
                        "cell_type": "code",
                        "execution_count": None,
                        "id": "a1",
                        "outputs": [],
                        "source": "print(1)",
                        "metadata": {
                            "nbgrader": {
                                "grade": True,
                                "grade_id": "q1",
                                "locked": True,
                                "points": 1,
                                "schema_version": 3,
                                "solution": False,
                            }
                        },
                    }
                ],
                "metadata": {},
                "nbformat": 4,
                "nbformat_minor": 5,
            }
        ),
        encoding="utf-8",
    )

    def edited(name: str, change: Any) -> Path:
        nb = _load(NB01)
        change(nb["cells"])
        path = tmp_path / name
        path.write_text(json.dumps(nb), encoding="utf-8")
        return path

    def cell_of(cells: list[dict[str, Any]], grade_id: str) -> dict[str, Any]:
        return next(c for c in cells if _nbgrader(c).get("grade_id") == grade_id)

    def delete(cells: list[dict[str, Any]]) -> None:
        cells.remove(cell_of(cells, "format_input_draft_code"))  # the learner's function
        cells.remove(cell_of(cells, "exercise_1_phi3_savings"))  # a check: put back, graded

    def rename(cells: list[dict[str, Any]]) -> None:
        _nbgrader(cell_of(cells, "exercise_2_code"))["grade_id"] = "my_style"

    def endless(cells: list[dict[str, Any]]) -> None:
        cell_of(cells, "format_input_draft_code")["source"] = (
            "def format_input_draft(entry):\n    while True:\n        pass\n"
        )

    submissions = [
        not_a_notebook,
        foreign,
        edited("deleted.ipynb", delete),
        edited("renamed.ipynb", rename),
        edited("endless.ipynb", endless),
    ]
    done = _classroom("grade", "--timeout", "20", *submissions, "--json", tmp_path / "r.json")
    out = done.stdout + done.stderr
    assert done.returncode == 2 and "Traceback" not in out, out  # 2: two could not be graded
    bad, other, deleted, renamed, looping = _results(tmp_path / "r.json")
    assert bad["notebook"] is None and len(bad["problems"]) == 1
    assert "not a Jupyter notebook" in bad["problems"][0]
    assert other["notebook"] is None and "not a notebook of this course" in other["problems"][0]
    assert out.count("Total: 0 points (nothing could be graded)") == 2

    assert len(deleted["problems"]) == 2, deleted["problems"]
    assert "'exercise_1_phi3_savings' is missing" in "".join(deleted["problems"])
    assert "'format_input_draft_code' is missing" in "".join(deleted["problems"])
    assert _points(deleted) == {
        "format_input_draft": (0, 2),
        "exercise_1_phi3_savings": (1, 1),
        "exercise_2_prompt_style": (2, 2),
    }

    assert len(renamed["problems"]) == 2, renamed["problems"]
    assert "'my_style' is not part of 01_dataset_formatting" in "".join(renamed["problems"])
    assert "'exercise_2_code' is missing" in "".join(renamed["problems"])
    assert renamed["points"] == renamed["max_points"] == 5  # the renamed cell's code still ran

    assert not looping["problems"]
    assert _points(looping) == {
        "format_input_draft": (0, 2),
        "exercise_1_phi3_savings": (1, 1),
        "exercise_2_prompt_style": (2, 2),
    }
    assert "timed out" in next(
        p["message"] for p in looping["parts"] if p["name"] == "format_input_draft"
    )


def test_make_grade_without_a_submission_says_what_to_type() -> None:
    _require_nbgrader()
    if shutil.which("make") is None:
        pytest.skip("needs GNU make")
    env = {k: v for k, v in os.environ.items() if k not in {"MAKEFLAGS", "MFLAGS", "MAKELEVEL"}}
    done = subprocess.run(
        ["make", "--no-print-directory", "-o", ".venv/.installed", "-o", ".venv/.kernel", "grade"],
        cwd=ROOT,
        env=env,
        text=True,
        capture_output=True,
        timeout=120,
        check=False,
    )
    assert done.returncode != 0
    assert "make grade: name the submitted notebook: make grade SUBMISSION=" in done.stderr
