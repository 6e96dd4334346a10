"""Training hyper-parameters (the chapter's defaults) and the learning-rate schedule."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any


@dataclass(frozen=True)
class TrainConfig:
    """Training hyper-parameters; the defaults are the chapter's."""

    num_epochs: int = 2
    lr: float = 5e-5
    weight_decay: float = 0.1
    eval_freq: int = 5  # evaluate every `eval_freq` optimizer steps...
    eval_iter: int = 5  # ...on this many train and validation batches
    seed: int = 123  # also seeds each epoch's shuffling (seed + epoch), so resume is exact
    grad_accum_steps: int = 1  # micro-batches per optimizer step
    max_grad_norm: float | None = None  # clip the gradient norm (None: no clipping)
    schedule: str = "constant"  # "constant" or "cosine" (decays to min_lr_ratio * lr)
    warmup_steps: int = 0  # linear warmup steps (either schedule)
    min_lr_ratio: float = 0.1
    bf16: bool = False  # bf16 autocast; only takes effect on CUDA
    early_stopping_patience: int | None = None  # evaluations without a new best val loss
    early_stopping_min_delta: float = 0.0
    checkpoint_dir: str | None = None  # where checkpoint.pt goes (every N steps and at the end)
    checkpoint_every: int | None = None
    sample_max_new_tokens: int = 35  # the chapter's per-epoch sample length
    progress: bool = True  # tqdm progress bar
    log_evals: bool = True  # print the chapter's "Ep 1 (Step 000000): ..." lines

    def __post_init__(self) -> None:
        for name in ("num_epochs", "eval_freq", "eval_iter", "grad_accum_steps"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"TrainConfig.{name} must be a positive integer, got {value!r}")
        if not (isinstance(self.lr, (int, float)) and self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"TrainConfig.lr must be a positive number, got {self.lr!r}")
        if not self.weight_decay >= 0:
            raise ValueError(f"TrainConfig.weight_decay must be >= 0, got {self.weight_decay!r}")
        if self.max_grad_norm is not None and not self.max_grad_norm > 0:
            raise ValueError(
                f"TrainConfig.max_grad_norm must be > 0 or None, got {self.max_grad_norm!r}"
            )
        if self.schedule not in ("constant", "cosine"):
            raise ValueError(
                f"TrainConfig.schedule must be 'constant' or 'cosine', got {self.schedule!r}"
            )
        if not isinstance(self.warmup_steps, int) or self.warmup_steps < 0:
            raise ValueError(
                f"TrainConfig.warmup_steps must be an integer >= 0, got {self.warmup_steps!r}"
            )
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(
                f"TrainConfig.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio!r}"
            )
        for name in ("early_stopping_patience", "checkpoint_every"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(
                    f"TrainConfig.{name} must be a positive integer or None, got {value!r}"
                )
        if self.checkpoint_every is not None and self.checkpoint_dir is None:
            raise ValueError("TrainConfig.checkpoint_every needs checkpoint_dir")

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> TrainConfig:
        """Rebuild a config saved with `asdict` (e.g. from a checkpoint), ignoring unknown keys."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in names})


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
