"""Run settings of `train`: hyper-parameters (`TrainConfig`), run options, the lr schedule.

`TrainConfig` holds what decides the trained weights (the chapter's defaults); `RunOptions`
holds how a run is carried out (progress bar, log lines, checkpoints), which never changes
the result. Each `TrainConfig` field documents itself in its metadata (`help`, `flag`):
the command line (helpers.run.cli) generates its training flags from them, and the checks in
`field_problem` are the only validation, used by both the dataclass and the command line.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from helpers.config import run_defaults

Check = Callable[[Any], str | None]  # returns what is wrong with a value, or None


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _positive_int(value: Any) -> str | None:
    if not _is_int(value):
        return f"must be an integer, got {value!r}"
    return None if value > 0 else f"must be > 0, got {value!r}"


def _int_at_least_zero(value: Any) -> str | None:
    if not _is_int(value):
        return f"must be an integer, got {value!r}"
    return None if value >= 0 else f"must be >= 0, got {value!r}"


def _positive_number(value: Any) -> str | None:
    return None if _is_number(value) and value > 0 else f"must be > 0 (finite), got {value!r}"


def _number_at_least_zero(value: Any) -> str | None:
    return None if _is_number(value) and value >= 0 else f"must be >= 0, got {value!r}"


def _fraction(value: Any) -> str | None:
    return None if _is_number(value) and 0 <= value <= 1 else f"must be in [0, 1], got {value!r}"


def _optional(check: Check) -> Check:
    def optional(value: Any) -> str | None:
        problem = None if value is None else check(value)
        return None if problem is None else f"{problem.split(', got')[0]} or None, got {value!r}"

    return optional


def _integer(value: Any) -> str | None:
    return None if _is_int(value) else f"must be an integer, got {value!r}"


def _boolean(value: Any) -> str | None:
    return None if isinstance(value, bool) else f"must be True or False, got {value!r}"


def _one_of(*choices: str) -> Check:
    def check(value: Any) -> str | None:
        return None if value in choices else f"must be one of {choices}, got {value!r}"

    return check


def _param(
    default: Any, help: str, check: Check | None, flag: str | None = None, **extra: Any
) -> Any:
    # A dataclass field that carries its command-line help, flag name and validation.
    return field(default=default, metadata={"help": help, "check": check, "flag": flag, **extra})


def field_problem(cls: type, name: str, value: Any) -> str | None:
    """What is wrong with `value` for field `name` of `cls` (None if it is valid)."""
    check = next(f.metadata.get("check") for f in fields(cls) if f.name == name)
    return check(value) if check is not None else None


def _validate(obj: Any) -> None:
    for f in fields(obj):
        problem = field_problem(type(obj), f.name, getattr(obj, f.name))
        if problem:
            raise ValueError(f"{type(obj).__name__}.{f.name} {problem}")


@dataclass(frozen=True)
class TrainConfig:
    """Training hyper-parameters (what decides the weights); the defaults are the chapter's."""

    num_epochs: int = _param(2, "training epochs", _positive_int, flag="--epochs")
    lr: float = _param(5e-5, "AdamW learning rate", _positive_number)
    weight_decay: float = _param(0.1, "AdamW weight decay", _number_at_least_zero)
    eval_freq: int = _param(5, "evaluate every N optimizer steps", _positive_int)
    eval_iter: int = _param(5, "train and validation batches per evaluation", _positive_int)
    seed: int = _param(
        123,
        "seeds the random initialisation of random-init models and each epoch's shuffling "
        "(seed + epoch), so a resumed run replays the same batches",
        _integer,
    )
    grad_accum_steps: int = _param(
        1, "micro-batches per optimizer step", _positive_int, flag="--grad-accum"
    )
    max_grad_norm: float | None = _param(
        None,
        "clip the gradient norm to this value (default: no clipping)",
        _optional(_positive_number),
    )
    schedule: str = _param(
        "constant",
        "learning-rate schedule (cosine decays to min-lr-ratio * lr)",
        _one_of("constant", "cosine"),
        choices=("constant", "cosine"),
    )
    warmup_steps: int = _param(0, "linear warmup steps (either schedule)", _int_at_least_zero)
    min_lr_ratio: float = _param(
        0.1, "final lr of the cosine schedule, as a share of lr", _fraction
    )
    bf16: bool = _param(False, "bf16 autocast (takes effect on CUDA only)", _boolean)
    early_stopping_patience: int | None = _param(
        None,
        "stop after PATIENCE evaluations without a better validation loss; keep the best weights",
        _optional(_positive_int),
        flag="--early-stopping",
        metavar="PATIENCE",
    )
    early_stopping_min_delta: float = _param(
        0.0, "smallest validation-loss drop that counts as better", _number_at_least_zero
    )

    def __post_init__(self) -> None:
        _validate(self)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> TrainConfig:
        """Rebuild a config saved with `asdict` (e.g. from a checkpoint), ignoring unknown keys."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in names})

    def differences(self, other: TrainConfig, *, ignore: tuple[str, ...] = ()) -> list[str]:
        """'name: mine (other: theirs)' for each field that differs, skipping `ignore`."""
        return [
            f"{f.name} {getattr(self, f.name)!r} (checkpoint: {getattr(other, f.name)!r})"
            for f in fields(self)
            if f.name not in ignore and getattr(self, f.name) != getattr(other, f.name)
        ]


@dataclass(frozen=True)
class RunOptions:
    """How `train` runs (output, checkpoints, signals); none of it changes the trained weights."""

    checkpoint_dir: str | os.PathLike | None = _param(None, "where checkpoint.pt goes", None)
    checkpoint_every: int | None = _param(
        None, "also checkpoint every N optimizer steps", _optional(_positive_int)
    )
    checkpoint_minutes: float | None = _param(
        None,
        "also checkpoint when this many minutes passed since the last one",
        _optional(_positive_number),
    )
    progress: bool = _param(True, "tqdm progress bar", _boolean)
    log_evals: bool = _param(True, "print the chapter's 'Ep 1 (Step 000000): ...' lines", _boolean)
    # SIGTERM/SIGHUP (a closed terminal, `kill`, a batch system's time limit) are handled
    # like Ctrl-C while training: checkpoint, then stop. Only possible in the main thread.
    handle_signals: bool = _param(True, "save a checkpoint on SIGTERM/SIGHUP too", _boolean)
    # The same losses up to float rounding (so it is not a hyper-parameter); faster on a GPU,
    # where 2 * eval_iter small forward passes per evaluation become 2 larger ones.
    eval_batched: bool = _param(
        False,
        "evaluate the eval_iter batches of each split in one forward pass (padded to one "
        "length; same losses up to float rounding, more memory)",
        _boolean,
    )

    def __post_init__(self) -> None:
        _validate(self)
        periodic = self.checkpoint_every is not None or self.checkpoint_minutes is not None
        if periodic and self.checkpoint_dir is None:
            raise ValueError("RunOptions.checkpoint_every/checkpoint_minutes need checkpoint_dir")


def lr_factor(step: int, total_steps: int, config: TrainConfig) -> float:
    """Multiplier of the base learning rate before optimizer step `step` (0-based)."""
    if step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    if config.schedule == "constant":
        return 1.0
    decay_steps = max(1, total_steps - config.warmup_steps)
    progress = min(1.0, (step - config.warmup_steps) / decay_steps)
    cosine = 0.5 * (1.0 + math.cos(math.pi * progress))
    return config.min_lr_ratio + (1.0 - config.min_lr_ratio) * cosine


def preset_train_config(model_name: str, **overrides: Any) -> TrainConfig:
    """`TrainConfig` with the preset's run defaults (`helpers.config.run_defaults`) applied."""
    preset = run_defaults(model_name)
    names = {f.name for f in fields(TrainConfig)}
    values = {f.name: getattr(preset, f.name) for f in fields(preset) if f.name in names}
    return TrainConfig(**{**values, **overrides})


def preset_overfit_config(model_name: str, **overrides: Any) -> TrainConfig:
    """The overfitting demo's `TrainConfig` (notebook 04): many epochs on a few entries."""
    preset = run_defaults(model_name)
    values = dict(num_epochs=preset.overfit_epochs, lr=preset.overfit_lr, warmup_steps=5,
                  eval_freq=5, eval_iter=1)  # fmt: skip
    return TrainConfig(**{**values, **overrides})
