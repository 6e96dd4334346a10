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


class DeviceError(ValueError):
    """A device this machine does not have (or no device name at all); names the ones it has."""


def _mps_available() -> bool:
    return bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())


def available_devices() -> list[str]:
    """The device names this machine can run on: cpu, then cuda and cuda:N, then mps."""
    names = ["cpu"]
    if torch.cuda.is_available():
        names += ["cuda", *(f"cuda:{i}" for i in range(torch.cuda.device_count()))]
    if _mps_available():
        names.append("mps")
    return names


def _device_trouble(name: str) -> str | None:
    """Why this machine cannot run on device `name`, or None if it can."""
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError, TypeError):
        return "is not a device name (this course runs on cpu, cuda, cuda:N or mps)"
    if device.type == "cpu":
        return None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            return "is not available: PyTorch finds no CUDA GPU (no GPU or driver, or a CPU-only build)"
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            return f"is not available: this machine has {count} CUDA device(s)"
        return None
    if device.type == "mps":
        return None if _mps_available() else "is not available: this machine has no Apple MPS"
    return f"is not a device this course runs on ({device.type}; it runs on cpu, cuda or mps)"


def check_device(name: str) -> torch.device:
    """`name` as a torch.device if this machine has it, else DeviceError naming the ones it has."""
    trouble = _device_trouble(name)
    if trouble is not None:
        raise DeviceError(
            f"device {name!r} {trouble}; available here: {', '.join(available_devices())}"
        )
    return torch.device(name)


def device_problem(value: object) -> str | None:
    """What is wrong with a --device value (None: the best available), or None (a settings check)."""
    if value is None:
        return None
    if not isinstance(value, str):
        return f"must be a device name such as cpu or cuda, got {value!r}"
    try:
        check_device(value)
    except DeviceError as err:
        return str(err)
    return None


def get_device(prefer: str | None = None) -> torch.device:
    """`prefer` if given (DeviceError if this machine lacks it), else CUDA, then Apple MPS, then CPU."""
    if prefer is not None:
        return check_device(prefer)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if _mps_available():
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


def check_output_dir(path: str | os.PathLike[str], needed_bytes: int = 0) -> Path:
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


def check_output_file(path: str | os.PathLike[str], flag: str, *, append: bool = False) -> Path:
    """Check, before a long job, that `path` can be written as a file; errors name `flag`.

    Makes its folder and writes a hidden probe there, as the atomic save will; `append=True`
    (a log appended to in place) also needs an existing file to be writable.
    """
    path = Path(path)
    if "\x00" in str(path):
        raise OutputDirError(f"{flag} {str(path)!r}: not a usable file name (a NUL character)")
    if path.is_dir():
        raise OutputDirError(f"{flag} {path}: is a folder; give a file name")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path.parent, prefix=f".{path.name}."):
            pass
        if append and path.exists():
            with path.open("a"):
                pass
    except OSError as exc:
        raise OutputDirError(f"{flag} {path}: not writable ({exc.strerror or exc})") from exc
    return path
