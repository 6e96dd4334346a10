"""The course-wide switches: which model a notebook or command uses, the device, run folders."""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from pathlib import Path

import torch

from helpers.config import is_pretrained_preset, resolve_model_name

COURSE_MODEL_ENV = "COURSE_MODEL"
DEFAULT_MODEL = "gpt2-medium (355M)"  # the chapter fine-tunes GPT-2 medium
REPO_ROOT = Path(__file__).resolve().parents[1]


def course_model(default: str = DEFAULT_MODEL) -> str:
    """Canonical preset name chosen by $COURSE_MODEL (e.g. `tiny` in CI), else `default`."""
    return resolve_model_name(os.environ.get(COURSE_MODEL_ENV, "").strip() or default)


def is_tiny(name: str) -> bool:
    """True when `name` is the offline `tiny` preset."""
    return resolve_model_name(name) == "tiny"


def describe_model(name: str, weights: str | None = None) -> str:
    """One line saying which model and weights produced an output, honest about tiny mode."""
    canonical = resolve_model_name(name)
    if weights is None:
        weights = "OpenAI GPT-2 weights" if is_pretrained_preset(canonical) else "random init"
    label = f"{canonical}, {weights}"
    if not is_pretrained_preset(canonical):
        label += " [TINY OFFLINE MODE: a small demo model, not GPT-2; outputs are not meaningful]"
    return label


def get_device(prefer: str | None = None) -> torch.device:
    """`prefer` if given, else CUDA, then Apple MPS, then CPU."""
    if prefer:
        return torch.device(prefer)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def model_slug(name: str) -> str:
    """File-name form of a preset, as the chapter names its files: 'gpt2-medium355M'."""
    return re.sub(r"[ ()]", "", resolve_model_name(name))


def run_dir(name: str) -> Path:
    """Default folder of a fine-tuning run: `runs/<slug>-sft` in the repository (git-ignored).

    The CLI, notebook 04 (which saves there) and notebook 05 (which loads from there) agree
    on it, whatever the current directory; without the repository it is `./runs/...`.
    """
    root = REPO_ROOT if (REPO_ROOT / "pyproject.toml").is_file() else Path.cwd()
    return root / "runs" / f"{model_slug(name)}-sft"


def finetuned_path(name: str) -> Path:
    """Where a run saves its fine-tuned model: `run_dir(name) / '<slug>-sft.safetensors'`."""
    return run_dir(name) / f"{model_slug(name)}-sft.safetensors"


class OutputDirError(OSError):
    """An output folder cannot take a run's files (not writable, too little free space)."""


def check_output_dir(path: str | os.PathLike, needed_bytes: int = 0) -> Path:
    """Create `path` if needed and check, before a long run, that it can take `needed_bytes`."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):  # the only sure test of writability
            pass
    except OSError as exc:
        raise OutputDirError(
            f"output folder {path} is not writable: {exc.strerror or exc}"
        ) from exc
    free = shutil.disk_usage(path).free
    if free < needed_bytes:
        raise OutputDirError(
            f"output folder {path} has {free / 2**20:.0f} MiB free; this run needs about "
            f"{needed_bytes / 2**20:.0f} MiB (model, checkpoint): free space or pick --output-dir"
        )
    return path
