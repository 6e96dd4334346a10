"""helpers.widgets.progress: tqdm's widget bar that leaves its final state as plain outputs."""

from __future__ import annotations

import json
import os
import sys
import types
from pathlib import Path
from typing import Any

import pytest
from tqdm.std import tqdm as std_tqdm

from helpers.widgets import progress
from helpers.widgets.live import WIDGET_VIEW
from helpers.widgets.progress import BAR_COLOURS, NotebookTqdm, in_jupyter_kernel
from tests.widgets.kernel import execute_cells


class FakeHandle:
    """What `IPython.display.display(..., display_id=True)` returns: records updates."""

    def __init__(self, shown: Any) -> None:
        self.shown = shown
        self.updates: list[tuple[dict[str, Any], dict[str, Any]]] = []

    def update(self, obj: dict[str, Any], **kwargs: Any) -> None:
        self.updates.append((obj, kwargs))


@pytest.fixture()
def displays(monkeypatch: pytest.MonkeyPatch) -> list[FakeHandle]:
    """Every display NotebookTqdm makes, without a kernel."""
    import IPython.display

    handles: list[FakeHandle] = []

    def fake_display(obj: Any, display_id: bool = False, **_: Any) -> FakeHandle:
        assert display_id is True, "the bar must be displayed under a display id"
        handles.append(FakeHandle(obj))
        return handles[-1]

    monkeypatch.setattr(IPython.display, "display", fake_display)
    return handles


def test_outside_jupyter_it_is_tqdm_std() -> None:
    assert not in_jupyter_kernel()
    assert progress.tqdm is std_tqdm
    assert list(progress.trange(3, disable=True)) == [0, 1, 2]


def test_in_jupyter_kernel_needs_a_kernel_shell(monkeypatch: pytest.MonkeyPatch) -> None:
    shell: Any = None
    ipython = types.SimpleNamespace(get_ipython=lambda: shell)
    monkeypatch.setitem(sys.modules, "IPython", ipython)
    monkeypatch.setitem(sys.modules, "ipykernel.zmqshell", types.ModuleType("ipykernel.zmqshell"))
    for name in [n for n in os.environ if n == "QT_API" or n.startswith("SPYDER")]:
        monkeypatch.delenv(name)
    assert not in_jupyter_kernel(), "ipykernel imported but no running shell"

    class ZMQInteractiveShell:
        kernel = object()

    shell = ZMQInteractiveShell()
    assert in_jupyter_kernel()
    monkeypatch.setenv("QT_API", "pyqt5")
    assert not in_jupyter_kernel(), "qtconsole shows text, not widgets"


def _closed(bar: NotebookTqdm) -> bool:
    """Whether all of the bar's widgets are closed (no comm left to the front end)."""
    return all(w.comm is None for w in (*bar.container.children, bar.container))


def test_closed_bar_leaves_its_final_state_as_plain_outputs(
    displays: list[FakeHandle], capsys: pytest.CaptureFixture[str]
) -> None:
    bar = NotebookTqdm(range(24), desc="fine-tuning", unit="step")
    assert len(displays) == 1 and displays[0].shown is bar.container
    assert "0%" in repr(bar.container), "what tqdm.notebook alone would store"
    assert sum(1 for _ in bar) == 24
    [(bundle, kwargs)] = displays[0].updates
    assert kwargs == {"raw": True}
    # No widget view: nbconvert's HTML export would pick it and draw nothing without JavaScript.
    assert set(bundle) == {"text/plain", "text/html"}
    assert bundle["text/plain"].startswith("fine-tuning: 100%|██████████| 24/24 [")
    assert "step/s]" in bundle["text/plain"]
    page = bundle["text/html"]
    assert page.startswith("<div>fine-tuning:\u2007100% <span")
    assert "width:100.0%;background-color:" + BAR_COLOURS["success"] in page
    assert "24/24\u2007[" in page and "&lt;" in page  # tqdm's escaped "[00:00<00:00"
    assert _closed(bar)
    bar.close()  # closing again changes nothing
    assert len(displays[0].updates) == 1
    assert capsys.readouterr() == ("", ""), "the widget is the only output"


def test_manual_bar_stopped_early_keeps_its_partial_state(displays: list[FakeHandle]) -> None:
    bar = NotebookTqdm(total=10, desc="broken")
    bar.update(3)
    bar.close()
    [(bundle, _)] = displays[0].updates
    assert bundle["text/plain"].startswith("broken:  30%|███       | 3/10 [")
    assert "width:30.0%;background-color:" + BAR_COLOURS["danger"] in bundle["text/html"]
    assert WIDGET_VIEW not in bundle and _closed(bar)


def test_bar_with_leave_false_leaves_an_empty_output(displays: list[FakeHandle]) -> None:
    bar = NotebookTqdm(range(4), desc="gone", leave=False)
    for _ in bar:
        pass
    assert displays[0].updates == [({"text/plain": ""}, {"raw": True})]
    label, pbar, _ = bar.container.children
    assert label.comm is None and pbar.comm is None and bar.container.comm is None


def test_disabled_and_delayed_bars(displays: list[FakeHandle]) -> None:
    for _ in NotebookTqdm(range(3), disable=True):
        pass
    assert displays == []
    bar = NotebookTqdm(total=2, desc="later", delay=3600)
    bar.update(2)
    bar.close()
    assert displays == [], "a bar that never reached its delay is never shown"
    bar = NotebookTqdm(total=2, desc="hidden", display=False)
    bar.update(2)
    bar.close()
    assert displays == []


def _run_notebook(path: Path) -> Any:
    return execute_cells(
        [
            "from helpers.widgets.progress import NotebookTqdm, tqdm\nassert tqdm is NotebookTqdm",
            "for _ in tqdm(range(24), desc='fine-tuning'):\n    pass",
            "bar = tqdm(total=3, desc='manual')",
            "bar.update(3)\nbar.close()",
        ],
        path,
        timeout=120,
    )


def test_executed_notebook_keeps_each_bars_final_state_without_widgets(tmp_path: Path) -> None:
    from tests.test_notebooks import widget_fallback_problems

    nb = _run_notebook(tmp_path)
    outputs = [o for cell in nb.cells for o in cell.outputs]
    assert all(o.output_type != "stream" or o.name != "stderr" for o in outputs), outputs
    assert not [o for o in outputs if WIDGET_VIEW in o.get("data", {})]
    bars = [o.data for o in outputs if "text/html" in o.get("data", {})]
    assert [data["text/plain"].split("|")[0] for data in bars] == [
        "fine-tuning: 100%",
        "manual: 100%",
    ]
    # the bar created in one cell and closed in the next updated the earlier cell's output
    assert nb.cells[2].outputs[0].data["text/plain"].startswith("manual: 100%|██████████| 3/3")
    saved = tmp_path / "bars.ipynb"
    saved.write_text(json.dumps(nb), encoding="utf-8")
    assert widget_fallback_problems(saved) == []
