"""`make lab`, the course's main command: JupyterLab serves the course with the project's kernel.

It serves the repository root (so `helpers/`, which every check names, is one click away) and
lands on notebook 01.

Starts it headless on a free loopback port (as root too, as in Docker and CI), talks to the
Jupyter server's REST API with a known token, and shuts it down; bounded in time.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
VENV = ROOT / ".venv"
START_TIMEOUT_S = 120
FIRST_NOTEBOOK = "notebooks/01_dataset_formatting.ipynb"
STOP_TIMEOUT_S = 30


def _require_make_and_venv() -> None:
    """Skip without make or .venv, except under CI=true (.ci/run): there it must run."""
    if shutil.which("make") is None:
        reason = "needs GNU make"
    elif not (VENV / "bin" / "jupyter").is_file():
        reason = "needs the project's .venv (make setup)"
    else:
        return
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(f"CI=true but the make lab test cannot run: {reason}")
    pytest.skip(reason)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _api(base: str, token: str, path: str, method: str = "GET") -> dict[str, Any]:
    request = urllib.request.Request(
        f"{base}/api/{path}", method=method, headers={"Authorization": f"token {token}"}
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        body = response.read()
    return json.loads(body) if body else {}


def _landing(base: str, token: str) -> str:
    """Where the server's root URL sends a browser: the path of its redirect."""

    class NoRedirect(urllib.request.HTTPRedirectHandler):
        def redirect_request(self, *args: object, **kwargs: object) -> None:
            return None

    opener = urllib.request.build_opener(NoRedirect)
    try:
        opener.open(f"{base}/?token={token}", timeout=10)
    except urllib.error.HTTPError as redirect:  # 302, not followed
        return urllib.parse.urlsplit(redirect.headers["Location"]).path
    raise AssertionError("the root URL did not redirect")


def _stop(proc: subprocess.Popen[Any]) -> None:
    """End make, JupyterLab and its kernels: the whole process group started for the test."""
    if proc.poll() is not None:
        return
    for sig, wait_s in ((signal.SIGTERM, STOP_TIMEOUT_S), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait_s)
            return
        except subprocess.TimeoutExpired:
            continue


def test_make_lab_serves_the_notebooks_with_the_project_kernel(tmp_path: Path) -> None:
    _require_make_and_venv()
    port, token = _free_port(), secrets.token_hex(16)
    base = f"http://127.0.0.1:{port}"
    # A make of its own, not a sub-make of `make test` (no inherited flags or jobserver).
    env = {k: v for k, v in os.environ.items() if k not in {"MAKEFLAGS", "MFLAGS", "MAKELEVEL"}}
    env |= {
        "COURSE_MODEL": "tiny",
        # Keep the user's Jupyter config, cookies and workspaces out of it, and theirs out of ours.
        "JUPYTER_CONFIG_DIR": str(tmp_path / "config"),
        "JUPYTER_RUNTIME_DIR": str(tmp_path / "runtime"),
    }
    args = f"--no-browser --ServerApp.port_retries=0 --IdentityProvider.token={token}"
    # `-o`: test the command, not whether the environment is up to date (no reinstall from here).
    command = ["make", "--no-print-directory", "-o", ".venv/.installed", "lab"]
    command += ["HOST=127.0.0.1", f"PORT={port}", f"ARGS={args}"]
    log_path = tmp_path / "lab.log"

    def log() -> str:
        return log_path.read_text(encoding="utf-8", errors="replace")[-4000:]

    with open(log_path, "wb") as log_file:
        proc = subprocess.Popen(
            command,
            cwd=ROOT,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group, so _stop reaches every child
        )
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if proc.poll() is not None:
                pytest.fail(f"make lab exited with {proc.returncode} before serving:\n{log()}")
            try:
                _api(base, token, "status")
                break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                if time.monotonic() > deadline:
                    pytest.fail(f"make lab did not serve within {START_TIMEOUT_S} s:\n{log()}")
                time.sleep(0.5)

        banner = log()
        assert "Course model: tiny" in banner and "COURSE_MODEL=<name>" in banner
        assert f"http://127.0.0.1:{port}/lab/tree/{FIRST_NOTEBOOK}" in banner

        # The server's root is the repository: notebooks/ and helpers/ side by side ...
        root = {item["name"]: item["type"] for item in _api(base, token, "contents")["content"]}
        assert root.get("notebooks") == "directory" and root.get("helpers") == "directory", root
        # ... and the landing page is notebook 01: the server's front door redirects there.
        assert _landing(base, token) == f"/lab/tree/{FIRST_NOTEBOOK}"
        model = _api(base, token, f"contents/{FIRST_NOTEBOOK}?content=1")
        assert model["type"] == "notebook"
        notebook = model["content"]
        assert notebook["cells"]
        kernel_name = notebook["metadata"]["kernelspec"]["name"]

        # ... and the kernel it asks for runs the project's own interpreter.
        specs = _api(base, token, "kernelspecs")
        assert specs["default"] == kernel_name
        argv = specs["kernelspecs"][kernel_name]["spec"]["argv"]
        interpreter = Path(argv[0])
        assert interpreter.is_absolute(), argv
        assert os.path.samefile(interpreter.parent, VENV / "bin"), argv
        assert argv[argv.index("-m") + 1] == "ipykernel_launcher", argv

        # Stop it the way a user's Ctrl-C would, cleanly; make then exits 0.
        _api(base, token, "shutdown", method="POST")
        assert proc.wait(timeout=STOP_TIMEOUT_S) == 0, log()
    finally:
        _stop(proc)
