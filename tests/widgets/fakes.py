"""A stand-in for IPython's `display`: records what the course's widgets publish, no kernel."""

from __future__ import annotations

from typing import Any, NamedTuple

import pytest


class Shown(NamedTuple):
    """One call of `display`: the raw MIME bundle, its display id, and whether it updates."""

    bundle: dict[str, Any]
    display_id: str | None
    update: bool


def capture_displays(monkeypatch: pytest.MonkeyPatch) -> list[Shown]:
    """Replace `IPython.display.display`; returns the list each call is appended to."""
    import IPython.display

    shown: list[Shown] = []

    def fake_display(
        obj: Any, *, raw: bool = False, display_id: str | None = None, update: bool = False
    ) -> None:
        assert raw, "the widgets publish raw MIME bundles"
        shown.append(Shown(obj, display_id, update))

    monkeypatch.setattr(IPython.display, "display", fake_display)
    return shown
