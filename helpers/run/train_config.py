"""Run settings of `train`: hyper-parameters (`TrainConfig`), run options, the lr schedule.

`TrainConfig` holds what decides the trained weights (the chapter's defaults); `RunOptions`
holds how a run is carried out (progress bar, log lines, checkpoints), which never changes
the result. Each `TrainConfig` field documents itself in its metadata (`help`, `flag`):
the command line (helpers.run.cli) generates its training flags from them, and their checks
(helpers.run.fields) are the only validation, used by both the dataclass and the command line.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

from helpers.config import run_defaults
from helpers.run.fields import (
    boolean,
    fraction,
    int_at_least_zero,
    integer,
    number_at_least_zero,
    one_of,
    optional,
    positive_int,
    positive_number,
    setting,
    validate,
)


@dataclass(frozen=True)
class TrainConfig:
    """Training hyper-parameters (what decides the weights); the defaults are the chapter's."""

    num_epochs: int = setting(2, "training epochs", positive_int, flag="--epochs")
    lr: float = setting(5e-5, "AdamW learning rate", positive_number)
    weight_decay: float = setting(0.1, "AdamW weight decay", number_at_least_zero)
    eval_freq: int = setting(5, "evaluate every N optimizer steps", positive_int)
    eval_iter: int = setting(5, "train and validation batches per evaluation", positive_int)
    seed: int = setting(
        123,
        "seeds the random initialisation of random-init models and each epoch's shuffling "
        "(seed + epoch), so a resumed run replays the same batches",
        integer,
    )
    grad_accum_steps: int = setting(
        1, "micro-batches per optimizer step", positive_int, flag="--grad-accum"
    )
    max_grad_norm: float | None = setting(
        None,
        "clip the gradient norm to this value (default: no clipping)",
        optional(positive_number),
    )
    schedule: str = setting(
        "constant",
        "learning-rate schedule (cosine decays to min-lr-ratio * lr)",
        one_of("constant", "cosine"),
        choices=("constant", "cosine"),
    )
    warmup_steps: int = setting(0, "linear warmup steps (either schedule)", int_at_least_zero)
    min_lr_ratio: float = setting(
        0.1, "final lr of the cosine schedule, as a share of lr", fraction
    )
    bf16: bool = setting(False, "bf16 autocast (takes effect on CUDA only)", boolean)
    early_stopping_patience: int | None = setting(
        None,
        "stop after PATIENCE evaluations without a better validation loss; keep the best weights",
        optional(positive_int),
        flag="--early-stopping",
        metavar="PATIENCE",
    )
    early_stopping_min_delta: float = setting(
        0.0, "smallest validation-loss drop that counts as better", number_at_least_zero
    )

    def __post_init__(self) -> None:
        validate(self)

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

    checkpoint_dir: str | os.PathLike[str] | None = setting(None, "where checkpoint.pt goes", None)
    checkpoint_every: int | None = setting(
        None, "also checkpoint every N optimizer steps", optional(positive_int)
    )
    checkpoint_minutes: float | None = setting(
        None,
        "also checkpoint when this many minutes passed since the last one",
        optional(positive_number),
    )
    # Stops like the end of training (a checkpoint is saved), so a later call with
    # `resume_from` continues the same run: e.g. a run split over several sessions.
    max_steps: int | None = setting(
        None, "stop after N optimizer steps in all (resumable)", optional(positive_int)
    )
    progress: bool = setting(True, "tqdm progress bar", boolean)
    log_evals: bool = setting(True, "print the chapter's 'Ep 1 (Step 000000): ...' lines", boolean)
    # SIGTERM/SIGHUP (a closed terminal, `kill`, a batch system's time limit) are handled
    # like Ctrl-C while training: checkpoint, then stop. Only possible in the main thread.
    handle_signals: bool = setting(True, "save a checkpoint on SIGTERM/SIGHUP too", boolean)
    # The same losses up to float rounding (so it is not a hyper-parameter); faster on a GPU,
    # where 2 * eval_iter small forward passes per evaluation become 2 larger ones.
    eval_batched: bool = setting(
        False,
        "evaluate the eval_iter batches of each split in one forward pass (padded to one "
        "length; same losses up to float rounding, more memory)",
        boolean,
    )
    # Runs with the same settings agree bit for bit only at the same thread count (and device);
    # one thread and the deterministic kernels make every run of the same settings identical.
    deterministic: bool = setting(
        False,
        "bit-for-bit reproducible training: one CPU thread (torch.set_num_threads(1)) and "
        "torch.use_deterministic_algorithms(True); slower",
        boolean,
    )

    def __post_init__(self) -> None:
        validate(self)
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
    values = dict(
        num_epochs=preset.overfit_epochs,
        lr=preset.overfit_lr,
        warmup_steps=5,
        eval_freq=5,
        eval_iter=1,
    )
    return TrainConfig(**{**values, **overrides})
