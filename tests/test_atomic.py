"""Atomic writes: a failure leaves the previous file and no temp file behind."""

from pathlib import Path

import pytest

from helpers.atomic import atomic_path, atomic_write_text


def test_write_creates_folders_and_content(tmp_path: Path) -> None:
    target = tmp_path / "a" / "b.txt"
    assert atomic_write_text(target, "héllo\n") == target
    assert target.read_text(encoding="utf-8") == "héllo\n"
    assert [p.name for p in target.parent.iterdir()] == ["b.txt"]


def test_failure_keeps_old_file_and_cleans_up(tmp_path: Path) -> None:
    target = tmp_path / "keep.txt"
    target.write_text("old")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("crash mid-write")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["keep.txt"]


def test_written_files_get_the_usual_permissions(tmp_path: Path) -> None:
    """Outputs are as readable as any file the user writes (umask), not private like mkstemp's."""
    import os
    import stat

    old = os.umask(0o022)
    try:
        atomic_write_text(tmp_path / "summary.json", "{}")
        with atomic_path(tmp_path / "model.bin") as tmp:
            tmp.write_bytes(b"x")
    finally:
        os.umask(old)
    for name in ("summary.json", "model.bin"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o644
