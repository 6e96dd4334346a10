"""Training checkpoints: everything needed to continue a run exactly, in one atomic file.

A checkpoint holds the model, optimizer and scheduler states, the step/epoch position, the
random-number-generator states and the loss history. Only tensors, numbers, strings, lists
and dicts are stored, so it loads with `torch.load(..., weights_only=True)`.
"""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import torch

from helpers.atomic import atomic_path

CHECKPOINT_FORMAT = "course-train-checkpoint/1"
CHECKPOINT_NAME = "checkpoint.pt"


class CheckpointError(ValueError):
    """A checkpoint file is missing, unreadable or not a training checkpoint."""


def capture_rng_state(generators: list[torch.Generator] | None = None) -> dict[str, Any]:
    """Python, torch CPU/CUDA and the given generators' states, as weights_only-safe values."""
    version, internal, gauss = random.getstate()
    state: dict[str, Any] = {
        # random.getstate() is a tuple; lists survive the weights_only loader.
        "python": [version, list(internal), gauss],
        "torch": torch.get_rng_state(),
        "generators": [g.get_state() for g in generators or []],
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(
    state: dict[str, Any], generators: list[torch.Generator] | None = None
) -> None:
    """Put back the states captured by `capture_rng_state`."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])
    saved = state.get("generators", [])
    generators = generators or []
    if len(saved) != len(generators):
        raise CheckpointError(
            f"checkpoint has {len(saved)} data-loader generator states, the loader has "
            f"{len(generators)}; resume with a loader built the same way"
        )
    for gen, gen_state in zip(generators, saved, strict=True):
        gen.set_state(gen_state.cpu())


def checkpoint_path(path: str | os.PathLike) -> Path:
    """A checkpoint file path; a directory means the `checkpoint.pt` inside it."""
    path = Path(path)
    return path / CHECKPOINT_NAME if path.is_dir() or path.suffix == "" else path


def save_checkpoint(path: str | os.PathLike, state: dict[str, Any]) -> Path:
    """Write `state` (see `train`) atomically; a crash mid-write keeps the previous file."""
    path = checkpoint_path(path)
    with atomic_path(path) as tmp:
        torch.save({"format": CHECKPOINT_FORMAT, **state}, tmp)
    return path


def load_checkpoint(path: str | os.PathLike, *, map_location: str | torch.device = "cpu") -> dict:
    """Read a checkpoint written by `save_checkpoint` (weights_only, so no code runs)."""
    path = checkpoint_path(path)
    if not path.is_file():
        raise CheckpointError(f"no training checkpoint at {path}")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # corrupt/truncated files raise many different errors
        raise CheckpointError(f"cannot read checkpoint {path}: {exc}") from exc
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path} is not a training checkpoint ({CHECKPOINT_FORMAT})")
    missing = [k for k in ("model", "optimizer", "step", "epoch", "history") if k not in state]
    if missing:
        raise CheckpointError(f"checkpoint {path} lacks field(s): {', '.join(missing)}")
    return state
