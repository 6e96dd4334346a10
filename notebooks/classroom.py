"""The course in a classroom: the student edition and grading, both done by nbgrader.

    python notebooks/classroom.py student [--out student]      # make student
    python notebooks/classroom.py grade SUBMISSION.ipynb ...     # make grade SUBMISSION=...

The committed notebooks are nbgrader *source* notebooks (notebooks/CONVENTIONS.md): solution
regions between `### BEGIN SOLUTION` / `### END SOLUTION`, graded check cells with
`### BEGIN HIDDEN TESTS` sections, written answers as manually graded markdown cells. This
script only arranges nbgrader's course folder and calls its own commands
(`nbgrader generate_assignment`, `nbgrader autograde`); then it reads nbgrader's gradebook and
prints points per part. All seven notebooks are one nbgrader assignment, `course`.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"
ASSIGNMENT = "course"
DEFAULT_TIMEOUT_S = 900  # notebook 04's training cell takes about 4 minutes on 2 CPU cores
# Markers a student notebook must never contain (nbgrader removes them with what they enclose).
SOLUTION_MARKERS = ("BEGIN SOLUTION", "END SOLUTION", "BEGIN HIDDEN TESTS", "END HIDDEN TESTS")
Sources = dict[str, dict[str, Any]]  # notebook name (no suffix) -> the source notebook's JSON


def source_notebooks() -> list[Path]:
    """The seven course notebooks, in order: nbgrader's source versions."""
    return sorted(NOTEBOOKS.glob("0*.ipynb"))


def _nbgrader(args: list[str], course_dir: Path, log: Path, limit_s: float | None = None) -> int:
    """Run one `nbgrader` command on `course_dir`, its log appended to `log`; its exit code.

    Past `limit_s` seconds the command is stopped (subprocess.TimeoutExpired).
    """
    env = dict(os.environ)
    # nbgrader runs `alembic` (its database migrations) from PATH: the environment's own.
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env["PYTHONWARNINGS"] = "ignore"  # SQLAlchemy's warnings are not the grader's business
    command = [sys.executable, "-m", "nbgrader", *args, f"--CourseDirectory.root={course_dir}"]
    with open(log, "a", encoding="utf-8") as out:
        return subprocess.run(
            command,
            cwd=course_dir,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            timeout=limit_s,
            check=False,
        ).returncode


def _log_errors(log: Path, limit: int = 3) -> str:
    """The last few ERROR lines of an nbgrader log, one line."""
    lines = [
        line.strip() for line in log.read_text(encoding="utf-8", errors="replace").splitlines()
    ]
    errors = [line for line in lines if "ERROR" in line or "Error" in line]
    return " | ".join(errors[-limit:]) or (lines[-1] if lines else "no output")


def generate(course_dir: Path) -> Path:
    """nbgrader's course folder with the source notebooks and their release (student) version."""
    source = course_dir / "source" / ASSIGNMENT
    source.mkdir(parents=True)
    for notebook in source_notebooks():
        shutil.copy2(notebook, source / notebook.name)
    log = course_dir / "generate.log"
    if _nbgrader(["generate_assignment", ASSIGNMENT, "--force"], course_dir, log) != 0:
        raise SystemExit(f"error: nbgrader generate_assignment failed: {_log_errors(log)}")
    return course_dir / "release" / ASSIGNMENT


def build_student(out: Path, course_dir: Path) -> list[Path]:
    """`make student`: the student edition of every notebook in `out` (replaced wholesale)."""
    shutil.rmtree(course_dir, ignore_errors=True)
    release = generate(course_dir)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    written = []
    for notebook in sorted(release.glob("*.ipynb")):
        nb = json.loads(notebook.read_text(encoding="utf-8"))
        # Outputs are cleared by nbgrader; the saved widget state belongs to those outputs.
        nb.get("metadata", {}).pop("widgets", None)
        text = json.dumps(nb, indent=1, ensure_ascii=False) + "\n"
        left = [marker for marker in SOLUTION_MARKERS if marker in text]
        if left:
            raise SystemExit(f"error: {notebook.name}: {', '.join(left)} left after nbgrader")
        target = out / notebook.name
        target.write_text(text, encoding="utf-8")
        written.append(target)
    return written


@dataclass
class Part:
    """One graded cell of a submission: its nbgrader grade id, points and why it lost them."""

    name: str
    points: float | None
    max_points: float
    manual: bool
    message: str = ""


@dataclass
class Result:
    """What grading one submission gave; `notebook` is None when nothing could be graded."""

    submission: str
    notebook: str | None = None
    problems: list[str] = field(default_factory=list)
    parts: list[Part] = field(default_factory=list)

    @property
    def points(self) -> float:
        return sum(p.points or 0.0 for p in self.parts if not p.manual)

    @property
    def max_points(self) -> float:
        return sum(p.max_points for p in self.parts if not p.manual)


def _grade_ids(nb: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """grade_id -> nbgrader metadata of every nbgrader cell of a notebook."""
    ids = {}
    for cell in nb.get("cells", []):
        meta = cell.get("metadata", {}).get("nbgrader") if isinstance(cell, dict) else None
        if isinstance(meta, dict) and isinstance(meta.get("grade_id"), str):
            ids[meta["grade_id"]] = meta
    return ids


def _read_notebook(path: Path) -> tuple[dict[str, Any] | None, str]:
    """The submission as JSON if it is a notebook, else None and the reason in a few words."""
    try:
        raw = path.read_bytes()
    except OSError as err:
        return None, f"cannot read it ({err.strerror or err})"
    try:
        nb = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None, "not a Jupyter notebook (not JSON)"
    if not isinstance(nb, dict) or not isinstance(nb.get("cells"), list):
        return None, "not a Jupyter notebook (no list of cells)"
    if nb.get("nbformat") != 4:
        return None, f"not a notebook in format 4 (nbformat {nb.get('nbformat')!r})"
    import nbformat  # here: `student` needs no notebook validation

    try:
        with warnings.catch_warnings():  # e.g. cells without ids: nbformat fixes those itself
            warnings.simplefilter("ignore")
            nbformat.validate(nb)
    except nbformat.ValidationError as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else "invalid"
        return None, f"not a valid notebook ({first[:120]})"
    return nb, ""


def identify(path: Path, sources: Sources) -> Result:
    """Which course notebook a submission is, and one line per cell it lost or renamed."""
    result = Result(str(path))
    nb, why = _read_notebook(path)
    if nb is None:
        result.problems.append(f"{path}: {why}; nothing to grade")
        return result
    ids = _grade_ids(nb)
    overlap = {name: len(ids.keys() & _grade_ids(src).keys()) for name, src in sources.items()}
    best = max(overlap, key=lambda name: overlap[name])
    if overlap[best] == 0:
        result.problems.append(
            f"{path}: not a notebook of this course (none of its cells is a graded part of "
            "notebooks 01-07); nothing to grade"
        )
        return result
    result.notebook = best
    expected = _grade_ids(sources[best])
    for name in sorted(expected.keys() - ids.keys()):
        what = "check" if expected[name]["grade"] and not expected[name]["solution"] else "answer"
        fix = "put back by the grader" if what == "check" else "its part fails if its code is gone"
        result.problems.append(
            f"{path}: {what} cell {name!r} is missing (deleted or renamed): {fix}"
        )
    for name in sorted(ids.keys() - expected.keys()):
        result.problems.append(
            f"{path}: cell {name!r} is not part of {best} (renamed?): graded as a plain cell"
        )
    return result


def _error_messages(autograded: Path) -> dict[str, str]:
    """grade_id -> the error a graded cell ended with, one line (empty when it passed)."""
    nb = json.loads(autograded.read_text(encoding="utf-8"))
    messages = {}
    for cell in nb["cells"]:
        meta = cell.get("metadata", {}).get("nbgrader", {})
        if not meta.get("grade"):
            continue
        errors = [o for o in cell.get("outputs", []) if o.get("output_type") == "error"]
        names = [o.get("ename", "") for o in errors]
        if "CellTimeoutError" in names:
            messages[meta["grade_id"]] = "timed out (an endless loop?): the cell was stopped"
        elif errors:
            first = str(errors[0].get("evalue", "")).strip().splitlines()
            messages[meta["grade_id"]] = f"{errors[0].get('ename')}: {first[0] if first else ''}"
    return messages


def _read_grades(course_dir: Path, student: str, result: Result, sources: Sources) -> None:
    """Fill `result.parts` from nbgrader's gradebook and the autograded notebook's errors."""
    from nbgrader.api import Gradebook  # imported here: `student` works without the database

    assert result.notebook is not None
    autograded = course_dir / "autograded" / student / ASSIGNMENT / f"{result.notebook}.ipynb"
    messages = _error_messages(autograded)
    meta = _grade_ids(sources[result.notebook])
    order = list(meta)
    with Gradebook(f"sqlite:///{course_dir / 'gradebook.db'}") as gb:
        submitted = gb.find_submission_notebook(result.notebook, ASSIGNMENT, student)
        grades = sorted(submitted.grades, key=lambda g: order.index(g.name))
        for grade in grades:
            manual = bool(meta[grade.name].get("solution"))
            points = None if grade.needs_manual_grade else float(grade.score)
            message = messages.get(grade.name, "")
            if manual:
                message = (
                    "written answer: to grade by hand"
                    if grade.needs_manual_grade
                    else ("written answer left empty")
                )
            result.parts.append(Part(grade.name, points, float(grade.max_score), manual, message))


def grade(paths: list[Path], timeout: int, keep: Path | None = None) -> list[Result]:
    """`make grade`: autograde each submission in a fresh nbgrader course folder."""
    sources = {p.stem: json.loads(p.read_text(encoding="utf-8")) for p in source_notebooks()}
    results = [identify(path, sources) for path in paths]
    gradable = [r for r in results if r.notebook]
    if not gradable:
        return results
    course_dir = Path(tempfile.mkdtemp(prefix="course-grading-"))
    try:
        generate(course_dir)
        for k, result in enumerate(gradable, start=1):
            try:
                _autograde_one(course_dir, f"submission-{k:02d}", result, sources, timeout)
            except Exception as err:  # one submission's failure must not stop the others
                result.problems.append(f"{result.submission}: could not be graded: {err}")
                result.notebook, result.parts = None, []
        if keep is not None:
            shutil.rmtree(keep, ignore_errors=True)
            shutil.copytree(course_dir / "autograded", keep)
    finally:
        shutil.rmtree(course_dir, ignore_errors=True)
    return results


def _write_clean(submission: Path, source: dict[str, Any], dest: Path) -> None:
    """The submission with nbgrader metadata only where the source has it, as the source has it.

    A cell whose grade id the source does not know (renamed, made up, malformed) becomes a plain
    cell: its code still runs, nbgrader does not trip over it. Known cells get the source's
    metadata back (points, lock), as nbgrader would restore them anyway.
    """
    nb = json.loads(submission.read_text(encoding="utf-8"))
    known = _grade_ids(source)
    for cell in nb["cells"]:
        meta = cell.get("metadata")
        if not isinstance(meta, dict) or "nbgrader" not in meta:
            continue
        grade_id = meta["nbgrader"].get("grade_id") if isinstance(meta["nbgrader"], dict) else None
        if grade_id in known:
            meta["nbgrader"] = dict(known[grade_id])
        else:
            del meta["nbgrader"]
    dest.write_text(json.dumps(nb), encoding="utf-8")


def _autograde_one(
    course_dir: Path, student: str, result: Result, sources: Sources, timeout: int
) -> None:
    """Copy one submission into nbgrader's layout, autograde it, read its points."""
    assert result.notebook is not None
    submitted = course_dir / "submitted" / student / ASSIGNMENT
    submitted.mkdir(parents=True)
    _write_clean(
        Path(result.submission), sources[result.notebook], submitted / f"{result.notebook}.ipynb"
    )
    log = course_dir / f"autograde-{student}.log"
    args = [
        "autograde",
        ASSIGNMENT,
        f"--student={student}",
        "--force",
        f"--Execute.timeout={timeout}",
        "--OverwriteCells.add_missing_cells=True",
    ]
    # Each cell has `timeout` seconds; a kernel that ignores the interrupt runs into this limit.
    cells = len(sources[result.notebook]["cells"])
    try:
        code = _nbgrader(args, course_dir, log, limit_s=timeout * (cells + 2))
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"stopped after {timeout * (cells + 2)} s") from None
    autograded = course_dir / "autograded" / student / ASSIGNMENT / f"{result.notebook}.ipynb"
    if code != 0 or not autograded.is_file():
        result.problems.append(f"{result.submission}: could not be graded: {_log_errors(log)}")
        result.notebook = None
        return
    _read_grades(course_dir, student, result, sources)


def _points(value: float | None) -> str:
    return "-" if value is None else f"{value:g}"


def report(result: Result) -> str:
    """Points per part and the total, one line per problem first."""
    lines = [
        f"== {result.submission}" + (f" (graded as {result.notebook})" if result.notebook else "")
    ]
    lines += [f"problem: {problem}" for problem in result.problems]
    if not result.notebook:
        lines.append("Total: 0 points (nothing could be graded)")
        return "\n".join(lines)
    width = max((len(p.name) for p in result.parts), default=0)
    for p in result.parts:
        lines.append(
            f"  {p.name:<{width}}  {_points(p.points):>3} / {p.max_points:g}  {p.message}".rstrip()
        )
    manual = [p for p in result.parts if p.manual and p.points is None]
    total = f"Total: {result.points:g} / {result.max_points:g} points graded automatically"
    if manual:
        by_hand = sum(p.max_points for p in manual)
        total += (
            f"; {by_hand:g} point{'s' if by_hand != 1 else ''} of written answers to grade by hand"
        )
    lines.append(total)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Command line: `student` or `grade`."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    student = commands.add_parser("student", help="build the student edition")
    student.add_argument("--out", type=Path, default=ROOT / "student")
    student.add_argument("--course-dir", type=Path, default=ROOT / "build" / "nbgrader")
    grading = commands.add_parser("grade", help="grade submitted notebooks (tiny mode, offline)")
    grading.add_argument("submissions", type=Path, nargs="+")
    grading.add_argument("--timeout", type=int, default=DEFAULT_TIMEOUT_S, help="seconds per cell")
    grading.add_argument("--json", type=Path, help="also write the results as JSON")
    grading.add_argument("--keep", type=Path, help="keep the executed (autograded) notebooks here")
    args = parser.parse_args(argv)
    if args.command == "student":
        written = build_student(args.out, args.course_dir)
        shown = args.out.relative_to(ROOT) if args.out.is_relative_to(ROOT) else args.out
        print(
            f"student edition: {len(written)} notebooks in {shown}/ (nbgrader's course folder: "
            f"{args.course_dir.relative_to(ROOT) if args.course_dir.is_relative_to(ROOT) else args.course_dir}/)"
        )
        return 0
    results = grade(args.submissions, args.timeout, args.keep)
    print("\n\n".join(report(r) for r in results))
    if args.json:
        rows = [{**asdict(r), "points": r.points, "max_points": r.max_points} for r in results]
        args.json.write_text(json.dumps(rows, indent=1) + "\n", encoding="utf-8")
    return 0 if all(r.notebook for r in results) else 2


if __name__ == "__main__":
    sys.exit(main())
