"""Support for tests that run a command line in a subprocess and stop it part-way."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest


def wait_for_file(path: Path, proc: subprocess.Popen[str], timeout: float = 180) -> None:
    """Wait until `path` exists; fail with the process's stderr if it exits or time runs out."""
    deadline = time.monotonic() + timeout
    while not path.is_file():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            _, err = proc.communicate(timeout=30)
            pytest.fail(f"no checkpoint appeared (rc {proc.returncode}): {err[-2000:]}")
        time.sleep(0.2)
