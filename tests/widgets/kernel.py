"""Run code cells in a fresh python3 kernel, saving widget state as `make notebooks` does."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest


def execute_cells(cells: list[str], folder: Path, timeout: int = 180) -> Any:
    """The executed notebook of `cells`, run in `folder`; skips where there is no python3 kernel."""
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(source) for source in cells]
    client = nbclient.NotebookClient(
        nb,
        timeout=timeout,
        kernel_name="python3",
        store_widget_state=True,
        resources={"metadata": {"path": str(folder)}},
    )
    try:
        client.execute()
    except Exception as exc:  # no kernel where the environment lacks one
        if "No such kernel" in str(exc):
            pytest.skip(f"no python3 Jupyter kernel: {exc}")
        raise
    return nb
