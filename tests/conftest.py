"""Shared test fixtures: offline tokenizer, the chapter's dataset from ../shared, tiny configs."""

from __future__ import annotations

import errno
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:  # helpers are imported by the fixtures, after the environment is set
    import torch

    from helpers.config import GPTConfig

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"

# Tests never touch the network: use the tokenizer files from ../shared unless told otherwise.
if "TIKTOKEN_CACHE_DIR" not in os.environ and (SHARED / "tiktoken-cache").is_dir():
    os.environ["TIKTOKEN_CACHE_DIR"] = str(SHARED / "tiktoken-cache")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MPLBACKEND", "Agg")


def _local_file(env: str, name: str) -> Path:
    path = Path(os.environ.get(env) or SHARED / "data" / name)
    if not path.is_file():
        pytest.skip(f"needs the chapter file {name} (set {env} or put ../shared beside the repo)")
    return path


@pytest.fixture(scope="session")
def chapter_data_path() -> Path:
    """Local copy of the chapter's instruction-data.json (CI: ../shared/data)."""
    return _local_file("COURSE_DATASET", "instruction-data.json")


@pytest.fixture(scope="session")
def chapter_data(chapter_data_path: Path) -> list[dict[str, str]]:
    """The chapter's 1,100 entries."""
    return json.loads(chapter_data_path.read_text(encoding="utf-8"))


@pytest.fixture(scope="session")
def responses_path() -> Path:
    """The chapter's published GPT-2 medium answers for the test split."""
    return _local_file("COURSE_RESPONSES", "instruction-data-with-response.json")


@pytest.fixture(scope="session")
def book_pairs() -> list[dict[str, str]]:
    """The book's 1,100 preference pairs (instruction-data-with-preference.json)."""
    path = _local_file("COURSE_PREFERENCES", "instruction-data-with-preference.json")
    return json.loads(path.read_text(encoding="utf-8"))


@pytest.fixture()
def tiny_config() -> GPTConfig:
    """A model config small enough for unit tests (GPT-2 vocabulary, short context)."""
    from helpers.config import get_config

    # No dropout (the tiny preset has 0.1): tests compare outputs and losses exactly.
    return get_config("tiny", context_length=128, emb_dim=32, n_heads=2, n_layers=2, drop_rate=0.0)


@pytest.fixture
def nan_after() -> Callable[..., torch.nn.Module]:
    """A wrapper model whose logits turn NaN after `calls` training forward passes."""
    import torch

    class NaNAfter(torch.nn.Module):
        def __init__(self, inner: torch.nn.Module, calls: int) -> None:
            super().__init__()
            self.inner, self.calls = inner, calls

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if self.training:
                self.calls -= 1
            logits = self.inner(x)
            return logits * float("nan") if self.calls < 0 else logits

    return NaNAfter


@pytest.fixture
def full_disk(monkeypatch: pytest.MonkeyPatch) -> Callable[..., Callable[..., None]]:
    """`full_disk(calls, free_after=1 MiB)`: checkpoint writes (torch.save) succeed `calls` more
    times, then fail as on a full disk: part of the file written, OSError(ENOSPC), and from
    then on shutil.disk_usage reports `free_after` bytes free. Returns `make_room(free=None)`:
    writes succeed again, and disk_usage reports `free` bytes (None: the real figure)."""
    import shutil

    import torch

    real_save, real_usage = torch.save, shutil.disk_usage
    reported: list[int | None] = [None]  # the free space disk_usage reports (None: real)

    def usage(path: Any) -> Any:
        found = real_usage(path)
        return found if reported[0] is None else found._replace(free=reported[0])

    def fill_after(calls: int, free_after: int = 2**20) -> Callable[..., None]:
        left = [calls]

        def save(obj: object, path: Any, *args: Any, **kwargs: Any) -> None:
            if left[0] <= 0:
                with open(path, "wb") as f:
                    f.write(b"the part that fitted")
                reported[0] = free_after
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            left[0] -= 1
            real_save(obj, path, *args, **kwargs)

        def make_room(free: int | None = None) -> None:
            reported[0] = free
            monkeypatch.setattr(torch, "save", real_save)

        monkeypatch.setattr(torch, "save", save)
        monkeypatch.setattr(shutil, "disk_usage", usage)
        return make_room

    return fill_after
