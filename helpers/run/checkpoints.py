"""Training checkpoints: the run state (`TrainState`) and the one file format that stores it.

A checkpoint holds the model, optimizer and scheduler states, the run's `TrainState`
(position, loss history, early-stopping record, random-number-generator states), the
hyper-parameters, a fingerprint of the data and the objective it trained (the chapter's
next-token loss, or DPO against a given reference model). This module is the only one that knows the
format: it writes it (atomically, never with non-finite weights), reads it with
`torch.load(..., weights_only=True)` (so no code runs) and checks that a run may resume
from it.
"""

from __future__ import annotations

import errno
import hashlib
import math
import os
import pickle
import random
import shutil
import traceback
import warnings
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import torch

from helpers.atomic import atomic_path
from helpers.run.train_config import TrainConfig

CHECKPOINT_FORMAT = "course-train-checkpoint/3"
CHECKPOINT_NAME = "checkpoint.pt"
# The chapter's objective (next-token cross-entropy), as checkpoints record it. Format 2
# recorded no objective: all its checkpoints are fine-tuning runs, and still resume.
CHAPTER_OBJECTIVE = "fine-tuning"
_FORMAT_2 = "course-train-checkpoint/2"


class CheckpointError(ValueError):
    """A checkpoint cannot be written, read or resumed from; the message says why, in one line."""


class DiskFullError(CheckpointError):
    """The disk filled up while writing a checkpoint; the previous checkpoint file is intact.

    `folder` is where it was written, `free` the bytes free there after the failed write (its
    temp file removed) and `needed` the bytes a checkpoint write needs there.
    """

    def __init__(self, message: str, *, folder: Path, free: int, needed: int) -> None:
        super().__init__(message)
        self.folder, self.free, self.needed = folder, free, needed


# errno values of a full disk (ENOSPC) and of an exceeded disk quota (EDQUOT).
_DISK_FULL_ERRNOS = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}
# How libraries without an errno report it: safetensors ("... (os error 28)"), the C library.
_DISK_FULL_TEXTS = ("No space left on device", "Disk quota exceeded", f"os error {errno.ENOSPC}")


@dataclass
class TrainState:
    """Where a run is; everything in it (with the weights) is what an exact resume needs."""

    step: int = 0  # optimizer steps done, i.e. the 0-based number of the next one
    epoch: int = 0  # the epoch in progress (0-based)
    batches: int = 0  # batches of that epoch already used
    tokens_seen: int = 0
    history: list[dict[str, float]] = field(default_factory=list)  # one row per evaluation
    best_val_loss: float = math.inf  # early stopping: best validation loss so far...
    best_step: int = -1  # ...at this 0-based step...
    best_weights: dict[str, torch.Tensor] | None = None  # ...with these weights
    bad_evals: int = 0  # evaluations since the best one
    stopped_early: bool = False
    rng: dict[str, Any] = field(default_factory=dict)  # see capture_rng_state

    def snapshot(self, generators: list[torch.Generator]) -> TrainState:
        """A copy (with the current random states) that later steps do not change."""
        return replace(self, history=list(self.history), rng=capture_rng_state(generators))

    def to_dict(self) -> dict[str, Any]:
        """The fields as a dict (tensors shared, not copied)."""
        return {f.name: getattr(self, f.name) for f in fields(self)}


@dataclass(frozen=True)
class Checkpoint:
    """One checkpoint file's contents."""

    model: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    scheduler: dict[str, Any]
    state: TrainState
    config: TrainConfig
    train_batches: int  # batches per epoch of the train loader it was made with
    data_fingerprint: str  # see data_fingerprint
    # What was trained: {"name": ..., plus what a resume must match, e.g. a reference model}.
    objective: Mapping[str, str] = field(default_factory=lambda: {"name": CHAPTER_OBJECTIVE})


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
    saved = state.get("generators", [])
    generators = generators or []
    if len(saved) != len(generators):
        raise CheckpointError(
            f"checkpoint has {len(saved)} data-loader generator states, the loader has "
            f"{len(generators)}; resume with a loader built the same way"
        )
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])
    for gen, gen_state in zip(generators, saved, strict=True):
        gen.set_state(gen_state.cpu())


def _feed(h: Any, item: Any) -> None:
    if isinstance(item, torch.Tensor):
        h.update(str(tuple(item.shape)).encode())
        h.update(item.detach().cpu().contiguous().numpy().tobytes())
    elif isinstance(item, (tuple, list)) and not all(isinstance(x, int) for x in item):
        for part in item:
            _feed(h, part)
    else:  # token id lists, numbers, strings
        h.update(repr(item).encode())
    h.update(b"|")


def data_fingerprint(datasets: Iterable[Any], batching: object = None) -> str:
    """SHA-256 of every example of the datasets (e.g. token ids) and of how they are batched."""
    h = hashlib.sha256(repr(batching).encode())
    for dataset in datasets:
        for index in range(len(dataset)):
            _feed(h, dataset[index])
        h.update(b"#")
    return h.hexdigest()[:16]


def checkpoint_path(path: str | os.PathLike[str]) -> Path:
    """A checkpoint file path; a directory means the `checkpoint.pt` inside it."""
    path = Path(path)
    return path / CHECKPOINT_NAME if path.is_dir() or path.suffix == "" else path


def remove_stale_temp_files(folder: str | os.PathLike[str]) -> list[Path]:
    """Delete half-written `.checkpoint.pt.*.tmp` files a killed run left; returns them."""
    folder = Path(folder)
    stale = sorted(folder.glob(f".{CHECKPOINT_NAME}.*.tmp")) if folder.is_dir() else []
    for tmp in stale:  # one run per folder: any temp file here is from a writer that died
        tmp.unlink(missing_ok=True)
    return stale


def weights_bytes(model: torch.nn.Module) -> int:
    """Size of the model's weights (state dict), in bytes; a tied head's tensor counted once."""
    return _storage_bytes(model.state_dict())


def checkpoint_bytes(model: torch.nn.Module, *, early_stopping: bool = False) -> int:
    """Estimated checkpoint size: weights plus AdamW's two moments (plus the best weights)."""
    return weights_bytes(model) * (4 if early_stopping else 3)


def file_bytes(path: str | os.PathLike[str]) -> int:
    """Size of the file at `path` in bytes; 0 when there is none (a checkpoint folder: its file)."""
    path = checkpoint_path(path) if Path(path).is_dir() else Path(path)
    return path.stat().st_size if path.is_file() else 0


def space_needed(checkpoint: int, *, model_file: int = 0, existing: int = 0) -> int:
    """Free bytes a run needs that writes a `checkpoint` and then a `model_file` (sizes in bytes).

    An `existing` checkpoint of that size in the folder is replaced, so its space is reused
    once the new checkpoint is complete; but the atomic write keeps the old file until the
    new one is whole, so a whole checkpoint's worth must be free in any case.
    """
    return max(checkpoint, model_file + checkpoint - existing)


def is_disk_full(exc: BaseException) -> bool:
    """Whether `exc` reports a full disk (or an exceeded quota), e.g. OSError(ENOSPC)."""
    if isinstance(exc, OSError) and exc.errno in _DISK_FULL_ERRNOS:
        return True
    return any(text in str(exc) for text in _DISK_FULL_TEXTS)


def _storages(item: Any) -> Iterator[torch.UntypedStorage]:
    # The tensors' storages in a nested payload (dicts, lists, tuples).
    if isinstance(item, torch.Tensor):
        yield item.untyped_storage()
    elif isinstance(item, Mapping):
        for value in item.values():
            yield from _storages(value)
    elif isinstance(item, (list, tuple)):
        for value in item:
            yield from _storages(value)


def _unique_storages(payload: Any) -> dict[tuple[Any, int], int]:
    # {(device, address): bytes} of each storage once: a tied head shares the embedding's.
    return {(s.device, s.data_ptr()): s.nbytes() for s in _storages(payload)}


def _storage_bytes(payload: Any) -> int:
    """Bytes of the tensor data in `payload` (dicts, lists, tuples), each storage once."""
    return sum(_unique_storages(payload).values())


def _payload_bytes(payload: Any) -> int:
    """About the bytes torch.save writes for `payload`, never fewer: each tensor storage once
    and whole, 128 bytes of archive entry per storage, and 1 MiB for the rest (the pickled
    history, random states, settings)."""
    storages = _unique_storages(payload)
    return sum(storages.values()) + 128 * len(storages) + 2**20


def _write_error(path: Path, exc: BaseException, size: int) -> CheckpointError:
    """The one-line error of a failed write of a `size`-byte checkpoint to `path`.

    torch reports a full disk as "[enforce fail at inline_container.cc] ... unexpected pos"
    (no errno): a failed write with less than `size` bytes free there is a full disk too.
    """
    free = shutil.disk_usage(path.parent).free if path.parent.is_dir() else 0
    if is_disk_full(exc) or (not isinstance(exc, OSError) and free < size):
        return DiskFullError(
            f"disk full: cannot write checkpoint {path}: it needs about {size / 2**20:.0f} MiB "
            f"free in {path.parent}, {free / 2**20:.0f} MiB are free",
            folder=path.parent,
            free=free,
            needed=size,
        )
    if isinstance(exc, OSError) and exc.strerror:
        reason = exc.strerror
    else:
        reason = (
            f"the write failed with {free / 2**20:.0f} MiB free there (disk full or not writable?)"
        )
    return CheckpointError(f"cannot write checkpoint {path}: {reason}")


def _release_frames(exc: BaseException | None) -> None:
    """Clear the local variables of the frames `exc` (and what it happened during) went through.

    torch's failed writer, still referenced there, keeps the deleted temp file open and its
    space taken: released, the free space measured next is what is really free.
    """
    while exc is not None:
        traceback.clear_frames(exc.__traceback__)
        exc = exc.__context__


def save_checkpoint(path: str | os.PathLike[str], checkpoint: Checkpoint) -> Path:
    """Write `checkpoint` atomically (a crash mid-write keeps the previous file); returns the path."""
    path = checkpoint_path(path)
    bad = [
        name
        for name, t in checkpoint.model.items()
        if t.is_floating_point() and not torch.isfinite(t).all()
    ]
    if bad:
        raise CheckpointError(
            f"not writing {path}: non-finite weights in {bad[0]} (a diverged run)"
        )
    payload = {
        "format": CHECKPOINT_FORMAT,
        "model": checkpoint.model,
        "optimizer": checkpoint.optimizer,
        "scheduler": checkpoint.scheduler,
        "state": checkpoint.state.to_dict(),
        "config": asdict(checkpoint.config),
        "train_batches": checkpoint.train_batches,
        "data_fingerprint": checkpoint.data_fingerprint,
        "objective": dict(checkpoint.objective),
    }
    try:
        with atomic_path(path) as tmp:
            torch.save(payload, tmp)
    except (OSError, RuntimeError) as exc:  # the temp file is gone, the old checkpoint intact
        _release_frames(exc)
        raise _write_error(path, exc, _payload_bytes(payload)) from exc
    return path


def _unreadable(path: Path, exc: Exception) -> str:
    """Why torch.load could not read `path`, in a few words (never torch's advice to set
    weights_only=False, which would run whatever code the file holds)."""
    with open(path, "rb") as f:
        head = f.read(4)
    if not head:
        return "the file is empty"
    if head.startswith(b"PK\x03\x04"):  # torch.save's zip archive
        if isinstance(exc, pickle.UnpicklingError):
            return "a torch.save file holding objects a checkpoint never has (not loaded)"
        return "a truncated or damaged torch.save file"
    if head.startswith(b"\x80"):  # a bare pickle
        return "a pickle file, not a torch.save checkpoint (not loaded)"
    return "not a torch.save file"


def _read(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise CheckpointError(f"no training checkpoint at {path}")
    try:
        with warnings.catch_warnings():  # e.g. "Detected pickle protocol 4": the error says it
            warnings.simplefilter("ignore")
            raw = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # corrupt/truncated files raise many different errors
        raise CheckpointError(
            f"cannot read {path}: not a course training checkpoint ({_unreadable(path, exc)})"
        ) from exc
    if not isinstance(raw, dict) or not str(raw.get("format", "")).startswith(
        "course-train-checkpoint/"
    ):
        raise CheckpointError(f"{path} is not a course training checkpoint ({CHECKPOINT_FORMAT})")
    if raw["format"] == _FORMAT_2:
        raw.setdefault("objective", {"name": CHAPTER_OBJECTIVE})
    elif raw["format"] != CHECKPOINT_FORMAT:
        raise CheckpointError(
            f"{path} is a {raw['format']} checkpoint from an older version; this one reads "
            f"{CHECKPOINT_FORMAT}: start a new run"
        )
    return raw


def load_checkpoint(
    path: str | os.PathLike[str], config_type: type[TrainConfig] = TrainConfig
) -> Checkpoint:
    """Read and validate a checkpoint written by `save_checkpoint`.

    `config_type`: the run's settings class (a TrainConfig or a subclass such as DPOConfig),
    which reads back the hyper-parameters a resume compares.
    """
    path = checkpoint_path(path)
    raw = _read(path)
    try:
        state = TrainState(**raw["state"])
        for name in ("step", "epoch", "batches", "tokens_seen"):
            if not isinstance(getattr(state, name), int) or getattr(state, name) < 0:
                raise ValueError(f"state.{name} is {getattr(state, name)!r}")
        checkpoint = Checkpoint(
            model=dict(raw["model"]),
            optimizer=dict(raw["optimizer"]),
            scheduler=dict(raw["scheduler"]),
            state=state,
            config=config_type.from_dict(raw["config"]),
            train_batches=int(raw["train_batches"]),
            data_fingerprint=str(raw["data_fingerprint"]),
            objective={str(k): str(v) for k, v in dict(raw["objective"]).items()},
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"checkpoint {path} has malformed metadata: {exc}") from exc
    return checkpoint


def _weights_mismatch(saved: dict[str, torch.Tensor], model: torch.nn.Module) -> str | None:
    mine = model.state_dict()
    extra = [k for k in saved if k not in mine]
    missing = [k for k in mine if k not in saved]
    if extra or missing:
        return (
            f"{len(extra)} unexpected weight(s) such as {extra[:1]}, {len(missing)} missing "
            f"such as {missing[:1]} (a different model size?)"
        )
    for name, tensor in saved.items():
        if tensor.shape != mine[name].shape:
            return f"{name} is {tuple(tensor.shape)} there, {tuple(mine[name].shape)} here"
    return None


def _parameters_mismatch(optimizer_state: dict[str, Any], model: torch.nn.Module) -> str | None:
    # A tied and an untied head have the same state-dict keys but not the same parameters.
    saved = sum(len(group["params"]) for group in optimizer_state.get("param_groups", []))
    mine = len(list(model.parameters()))
    if saved == mine:
        return None
    return (
        f"it trained {saved} parameter tensors, this model has {mine} (tied vs untied output "
        "head, i.e. chapter-faithful mode switched?)"
    )


def _objective_mismatch(saved: Mapping[str, str], mine: Mapping[str, str]) -> str | None:
    if saved.get("name") != mine.get("name"):
        return f"the checkpoint is from a {saved.get('name')} run, this is a {mine.get('name')} run"
    for key in sorted(set(saved) | set(mine)):
        if saved.get(key) != mine.get(key):
            return (
                f"the {key} differs from the one the checkpoint was trained with "
                f"(fingerprint {mine.get(key)}, checkpoint {saved.get(key)})"
            )
    return None


def check_resumable(
    checkpoint: Checkpoint,
    *,
    model: torch.nn.Module,
    config: TrainConfig,
    train_batches: int,
    data_fingerprint: str,
    objective: Mapping[str, str] | None = None,
) -> None:
    """Refuse (CheckpointError) to resume another objective, hyper-parameters, data or model.

    Only `num_epochs` may change (to train on for longer). `objective` defaults to the
    chapter's (`{"name": CHAPTER_OBJECTIVE}`).
    """
    mismatch = _objective_mismatch(checkpoint.objective, objective or {"name": CHAPTER_OBJECTIVE})
    if mismatch:
        raise CheckpointError(f"cannot resume: {mismatch}")
    changed = config.differences(checkpoint.config, ignore=("num_epochs",))
    if changed:
        raise CheckpointError(f"cannot resume: hyper-parameters changed: {'; '.join(changed)}")
    if checkpoint.train_batches != train_batches:
        raise CheckpointError(
            f"cannot resume: the train loader has {train_batches} batches, the checkpoint was "
            f"made with {checkpoint.train_batches}"
        )
    if checkpoint.data_fingerprint != data_fingerprint:
        raise CheckpointError(
            "cannot resume: the data differ from the checkpoint's (training or validation "
            "examples, or their batch size, prompt masking or max length; fingerprint "
            f"{data_fingerprint}, checkpoint {checkpoint.data_fingerprint})"
        )
    mismatch = _weights_mismatch(checkpoint.model, model) or _parameters_mismatch(
        checkpoint.optimizer, model
    )
    if mismatch:
        raise CheckpointError(
            f"cannot resume: the checkpoint's weights do not fit the model: {mismatch}"
        )
