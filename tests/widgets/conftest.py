"""Fixtures for the widget tests."""

from __future__ import annotations

import pytest

from tests.widgets.fakes import Shown, capture_displays


@pytest.fixture()
def published(monkeypatch: pytest.MonkeyPatch) -> list[Shown]:
    """Every output the widgets publish through IPython's `display`, without a kernel."""
    return capture_displays(monkeypatch)
