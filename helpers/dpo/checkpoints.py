"""DPO checkpoints: the file format, atomic save and safe load, and the checks before a resume.

A checkpoint holds the policy and optimizer state, the position in the run, every random
generator's state, the history so far, the run's settings and a fingerprint of the frozen
reference model. `check_resume` refuses a checkpoint made with other settings, another train
loader size or another reference model, so `train_dpo(resume_from=...)` continues the same run.
"""

from __future__ import annotations

import hashlib
import os
import random
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from helpers.atomic import atomic_path

DPO_CHECKPOINT_FORMAT = "course-dpo-checkpoint/1"
CHECKPOINT_NAME = "dpo-checkpoint.pt"
# Settings that must match for a resumed run to continue the same one.
RESUME_KEYS = ("seed", "beta", "eval_freq", "eval_iter", "lr", "weight_decay")


class DPOCheckpointError(ValueError):
    """A DPO checkpoint that is missing, unreadable, or does not fit this run."""


def state_fingerprint(model: nn.Module) -> str:
    """sha256 of every tensor of the state dict, in key order: equal iff the weights are."""
    digest = hashlib.sha256()
    for key, tensor in sorted(model.state_dict().items()):
        digest.update(key.encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def capture_rng(generators: list[torch.Generator]) -> dict[str, Any]:
    """Python's, torch's (and CUDA's) random states and those of the loaders' `generators`."""
    version, internal, gauss = random.getstate()
    state: dict[str, Any] = {
        "python": [version, list(internal), gauss],
        "torch": torch.get_rng_state(),
        "generators": [g.get_state() for g in generators],
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any], generators: list[torch.Generator]) -> None:
    """Put back the random states from `capture_rng` (also into `generators`)."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])
    for gen, saved in zip(generators, state["generators"], strict=True):
        gen.set_state(saved.cpu())


def dpo_checkpoint_path(path: str | os.PathLike) -> Path:
    """A checkpoint file; a directory (or a name without suffix) means the file inside it."""
    path = Path(path)
    return path / CHECKPOINT_NAME if path.is_dir() or path.suffix == "" else path


def save_dpo_checkpoint(path: str | os.PathLike, state: dict[str, Any]) -> Path:
    """Write a DPO checkpoint atomically (tensors, numbers, strings, lists and dicts only)."""
    path = dpo_checkpoint_path(path)
    with atomic_path(path) as tmp:
        torch.save({"format": DPO_CHECKPOINT_FORMAT, **state}, tmp)
    return path


def load_dpo_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Read a checkpoint from `save_dpo_checkpoint` with `weights_only=True` (no code runs)."""
    path = dpo_checkpoint_path(path)
    if not path.is_file():
        raise DPOCheckpointError(f"no DPO checkpoint at {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated or corrupt files raise many different errors
        raise DPOCheckpointError(f"cannot read DPO checkpoint {path}: {exc}") from exc
    if not isinstance(state, dict) or state.get("format") != DPO_CHECKPOINT_FORMAT:
        raise DPOCheckpointError(f"{path} is not a DPO checkpoint ({DPO_CHECKPOINT_FORMAT})")
    return state


def check_resume(ckpt: dict, settings: Mapping[str, Any], n_batches: int, reference: str) -> None:
    """Refuse `ckpt` unless `settings` (the run's DPOConfig as a dict), the number of train
    batches and the reference model's fingerprint match the run it was saved from."""
    saved = ckpt.get("config", {})
    for key in RESUME_KEYS:
        if saved.get(key) != settings[key]:
            raise DPOCheckpointError(
                f"cannot resume: {key}={settings[key]!r} but the checkpoint used {saved.get(key)!r}"
            )
    if ckpt.get("train_batches") != n_batches:
        raise DPOCheckpointError(
            f"cannot resume: the train loader has {n_batches} batches, the checkpoint was "
            f"made with {ckpt.get('train_batches')}"
        )
    if ckpt.get("reference") != reference:
        raise DPOCheckpointError(
            "cannot resume: the reference model differs from the one the checkpoint was "
            "trained against (load the same instruction-tuned model)"
        )
