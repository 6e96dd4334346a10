"""A writer killed (kill -9) while saving a rating leaves a hidden temp file: the next open removes it.

Real processes: a child rates into the file and is stopped inside the atomic write (its
fsync never returns), so its temp file exists; while it lives its temp is left alone, once
it is killed the next RatingStore on the file removes the temp and keeps every rating.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from helpers.review.ratings import RatingStore, read_ratings

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals and flock")

CHILD = textwrap.dedent(
    """
    import os, sys, time
    from helpers.review.ratings import RatingStore

    store = RatingStore(sys.argv[1], reviewer="child")
    real_fsync = os.fsync

    def stuck(fd):  # the temp file is written, never renamed: as when killed mid-save
        print("writing", flush=True)
        time.sleep(600)

    os.fsync = stuck
    store.rate(1, "wrong")
    """
)


def temps(path: Path) -> list[Path]:
    return sorted(path.parent.glob(f".{path.name}.*.tmp"))


def start_stuck_writer(path: Path) -> subprocess.Popen[str]:
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(path)], stdout=subprocess.PIPE, text=True
    )
    assert child.stdout is not None
    assert child.stdout.readline().strip() == "writing"  # inside the atomic write, lock held
    return child


@pytest.mark.parametrize("suffix", [".json", ".jsonl"])
def test_temp_of_a_killed_writer_is_removed_at_the_next_open(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"ratings{suffix}"
    RatingStore(path, reviewer="me").rate(0, "correct")
    child = start_stuck_writer(path)
    try:
        assert len(temps(path)) == 1
        # A live writer's temp file is left alone (and opening does not wait for it).
        started = time.monotonic()
        assert RatingStore(path, reviewer="me").ratings.keys() == {0}
        assert time.monotonic() - started < 10 and len(temps(path)) == 1
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.wait(timeout=30)
    assert len(temps(path)) == 1  # what kill -9 leaves behind
    store = RatingStore(path, reviewer="me")
    assert temps(path) == []
    assert [(r["index"], r["rating"]) for r in read_ratings(path)] == [(0, "correct")]
    store.rate(2, "partly")  # and saving still works
    assert [r["index"] for r in read_ratings(path)] == [0, 2] and temps(path) == []


def test_save_removes_temps_left_by_a_dead_writer(tmp_path: Path) -> None:
    path = tmp_path / "ratings.json"
    store = RatingStore(path, reviewer="me")  # opened before the writer died
    child = start_stuck_writer(path)
    os.kill(child.pid, signal.SIGKILL)
    child.wait(timeout=30)
    assert len(temps(path)) == 1
    store.rate(0, "correct")
    assert temps(path) == [] and len(read_ratings(path)) == 1
