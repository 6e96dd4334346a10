"""Support for tests/test_browser.py: a headless JupyterLab and a headless Chromium, both bounded.

Everything runs on 127.0.0.1 with no network: Debian's `chromium` + `chromium-driver`
(/usr/bin/chromium, /usr/bin/chromedriver) driven by selenium, and JupyterLab from the
running interpreter's environment. Both are started in their own session and are killed, with
everything they spawned (kernels, renderer processes), when the context managers exit.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NamedTuple, TypeVar

CHROMIUM = Path(os.environ.get("BROWSER_CHROMIUM", "/usr/bin/chromium"))
CHROMEDRIVER = Path(os.environ.get("BROWSER_CHROMEDRIVER", "/usr/bin/chromedriver"))

# Flags that work as root on a closed network (no sandbox, nothing phoning home).
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--disable-crash-reporter",
    "--window-size=1400,1800",
]

T = TypeVar("T")


def missing_browser() -> str | None:
    """Why the browser test cannot run here, or None when it can."""
    missing = [str(p) for p in (CHROMIUM, CHROMEDRIVER) if not os.access(p, os.X_OK)]
    try:
        import selenium  # noqa: F401
    except ImportError:
        missing.append("the selenium package")
    if not missing:
        return None
    return (
        f"needs a headless browser: {', '.join(missing)} not found "
        "(install with .ci/browser-deps.sh: apt chromium chromium-driver, pip selenium)"
    )


def wait_for(what: str, probe: Callable[[], T | None], timeout: float, interval: float = 0.25) -> T:
    """Call `probe` until it returns something truthy; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    last_error: BaseException | None = None
    while True:
        try:
            value = probe()
            if value:
                return value
        except Exception as err:  # the page is changing under us: try again
            last_error = err
        if time.monotonic() > deadline:
            detail = f" (last error: {last_error!r})" if last_error else ""
            raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}{detail}")
        time.sleep(interval)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _kill_marked(marker: str) -> None:
    """Kill our own leftovers: processes whose command line names our private temp folder."""
    me = os.getpid()
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == me:
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if marker in cmdline:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(int(proc.name), signal.SIGKILL)


def _stop_group(proc: subprocess.Popen[Any], grace: float = 10) -> None:
    """SIGTERM the process group (lets Jupyter shut its kernels down), then SIGKILL it."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            pass
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(5)


class Lab(NamedTuple):
    url: str  # http://127.0.0.1:PORT
    token: str
    root: Path  # the served folder (a copy, so autosave cannot touch the repository)
    log: Path

    def open_url(self, name: str) -> str:
        return f"{self.url}/lab/tree/{name}?token={self.token}"


@contextlib.contextmanager
def jupyterlab(
    notebooks: list[Path], workdir: Path, env: dict[str, str], timeout: float = 60
) -> Iterator[Lab]:
    """JupyterLab on a free loopback port, serving copies of `notebooks`, with private config."""
    root = workdir / "root"
    root.mkdir()
    for nb in notebooks:
        shutil.copy2(nb, root / nb.name)
    jupyter_home = workdir / "jupyter"
    settings = jupyter_home / "lab-settings"
    # No news / update check: it would try the network and put a toast over the screenshot.
    notification = (
        settings / "@jupyterlab" / "apputils-extension" / "notification.jupyterlab-settings"
    )
    notification.parent.mkdir(parents=True)
    notification.write_text(json.dumps({"fetchNews": "false", "checkForUpdates": False}))
    # Every cell in the DOM (no virtual scrolling), so selenium finds the inspector's output.
    tracker = settings / "@jupyterlab" / "notebook-extension" / "tracker.jupyterlab-settings"
    tracker.parent.mkdir(parents=True)
    tracker.write_text(json.dumps({"windowingMode": "none"}))
    token = secrets.token_hex(16)
    port = free_port()
    lab_env = {
        **os.environ,
        **env,
        # Private user dirs, so nothing from ~/.jupyter or ~/.local/share/jupyter leaks in;
        # extensions and kernels still come from sys.prefix/share/jupyter.
        "JUPYTER_CONFIG_DIR": str(jupyter_home / "config"),
        "JUPYTER_DATA_DIR": str(jupyter_home / "data"),
        "JUPYTER_RUNTIME_DIR": str(jupyter_home / "runtime"),
        "JUPYTER_PLATFORM_DIRS": "1",
        "IPYTHONDIR": str(jupyter_home / "ipython"),
    }
    cmd = [
        sys.executable,
        "-m",
        "jupyterlab",
        "--no-browser",
        "--ServerApp.ip=127.0.0.1",
        f"--ServerApp.port={port}",
        "--ServerApp.port_retries=0",
        f"--ServerApp.root_dir={root}",
        f"--IdentityProvider.token={token}",
        "--ServerApp.password=",
        f"--LabApp.user_settings_dir={settings}",
        f"--LabApp.workspaces_dir={jupyter_home / 'workspaces'}",
        "--LabApp.news_url=None",
        "--ServerApp.terminals_enabled=False",
    ]
    if os.geteuid() == 0:
        cmd.append("--allow-root")
    log = workdir / "jupyterlab.log"
    with open(log, "wb") as log_file:
        proc = subprocess.Popen(
            cmd,
            cwd=root,
            env=lab_env,
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    lab = Lab(f"http://127.0.0.1:{port}", token, root, log)
    try:

        def ready() -> bool:
            if proc.poll() is not None:
                raise RuntimeError(f"JupyterLab exited ({proc.returncode}):\n{log.read_text()}")
            request = urllib.request.Request(
                f"{lab.url}/api/status", headers={"Authorization": f"token {token}"}
            )
            try:
                with urllib.request.urlopen(request, timeout=2) as response:
                    return response.status == 200
            except (urllib.error.URLError, OSError):
                return False

        try:
            wait_for("JupyterLab's /api/status", ready, timeout, interval=0.5)
        except RuntimeError as err:  # exited: report the log, not a timeout
            raise AssertionError(str(err)) from None
        yield lab
    finally:
        _stop_group(proc)
        _kill_marked(f"{workdir}/")  # kernels run in their own session


@contextlib.contextmanager
def chromium(workdir: Path, timeout: float = 60) -> Iterator[Any]:
    """A selenium driver for headless Chromium; never lets Selenium Manager fetch anything."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    os.environ["SE_OFFLINE"] = "true"  # Selenium Manager: no downloads, ever
    home = Path(tempfile.mkdtemp(prefix="chromium-", dir=workdir))
    profile = home / "profile"
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in [*CHROMIUM_FLAGS, f"--user-data-dir={profile}"]:
        options.add_argument(flag)
    service = Service(
        executable_path=str(CHROMEDRIVER),
        log_output=str(home / "chromedriver.log"),
        # Crash reports and caches go to our temp folder, not ~/.config/chromium.
        env={
            **os.environ,
            "XDG_CONFIG_HOME": str(home / "config"),
            "XDG_CACHE_HOME": str(home / "cache"),
        },
        popen_kw={"start_new_session": True},
    )
    driver = None
    try:
        driver = webdriver.Chrome(service=service, options=options)
        driver.set_page_load_timeout(timeout)
        driver.set_script_timeout(timeout)
        yield driver
    finally:
        if driver is not None:
            with contextlib.suppress(Exception):
                driver.quit()
        process = getattr(service, "process", None)
        if process is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
        _kill_marked(f"{home}/")  # incl. crashpad handlers (own sessions)
