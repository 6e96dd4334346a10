"""DPO training: the policy from the instruction model, tuned against a frozen reference.

`train_dpo` follows the book's `train_model_dpo_simple` (AdamW with a small learning rate,
one epoch, beta 0.1, evaluation every 5 steps on 5 batches) and runs through the course's
one training loop, `helpers.train.train`, so it has the same checkpoints and exact resume,
signal handling, periodic saves, free-space check and NaN watch as fine-tuning. What is
DPO's own is here: `dpo_objective` (the DPO loss of a batch against the reference, and an
evaluation that adds the rewards and their margin to the history), `DPOConfig` (the book's
settings and beta) and `dpo_run_defaults` (the book's or the tiny preset's run settings).
`plot_dpo_history` (loss and reward-margin curves) is in helpers.dpo.outputs.

The rewards in the history and the printed lines are the course's, beta x log-ratio
(columns `*_chosen_reward`, `*_rejected_reward`, `*_reward_margin`); with
`chapter_compat=True` they are the book's, the log-ratio itself (`*_chosen_logratio`,
`*_rejected_logratio`, `*_logratio_margin`, 1/beta times larger), printed as the book
prints them ("Train reward margins ...").
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from typing import Any

import pandas as pd
import torch
from torch import nn
from torch.utils.data import DataLoader

from helpers.config import resolve_model_name
from helpers.dpo.loss import (
    COURSE_REWARDS,
    dpo_loss_batch,
    dpo_loss_loader,
    freeze_reference,
    reward_names,
)
from helpers.model import eval_mode
from helpers.run.fields import positive_number, setting
from helpers.run.train_config import RunOptions, TrainConfig
from helpers.train import Objective, train

METRICS = COURSE_REWARDS.metrics  # rewards = beta x log-ratio (the book's: BOOK_REWARDS)


def history_columns(chapter_compat: bool = False) -> list[str]:
    """The DPO history's columns: step, epoch, tokens_seen, then each metric per split."""
    metrics = reward_names(chapter_compat).metrics
    return [
        "step",
        "epoch",
        "tokens_seen",
        *(f"{s}_{m}" for s in ("train", "val") for m in metrics),
    ]


HISTORY_COLUMNS = history_columns()
BOOK_HISTORY_COLUMNS = history_columns(chapter_compat=True)


@dataclass(frozen=True)
class DPORunDefaults:
    """DPO run settings that depend on the model: the book's, or the tiny preset's."""

    limit: int | None  # use only the first N preference pairs (None: all)
    lr: float  # AdamW learning rate
    batch_size: int
    max_length: int  # sequences are cut to this many tokens
    eval_freq: int
    eval_iter: int
    max_new_tokens: int  # length of the before/after answers


# The book's bonus notebook: all 1,100 pairs, batch 8, learning rate 5e-6, eval every 5 steps.
BOOK_DPO_DEFAULTS = DPORunDefaults(
    limit=None,
    lr=5e-6,
    batch_size=8,
    max_length=1024,
    eval_freq=5,
    eval_iter=5,
    max_new_tokens=256,
)
# tiny (notebook 04's tiny model, two CPU cores): the book's run shape, all pairs in batches
# of 8 for one epoch (116 steps, about 2.5 minutes), with a learning rate large enough for a
# small model to move: measured, 1e-4 grows the validation reward margin steadily while the
# answers lose some content (ROUGE-L 0.30 -> 0.22); 5e-4 grows it about four times as far
# and makes most answers loop.
TINY_DPO_DEFAULTS = DPORunDefaults(
    limit=None, lr=1e-4, batch_size=8, max_length=128, eval_freq=20, eval_iter=3, max_new_tokens=32
)


def dpo_run_defaults(name: str) -> DPORunDefaults:
    """The DPO settings for preset `name`: TINY_DPO_DEFAULTS for tiny, else the book's."""
    return TINY_DPO_DEFAULTS if resolve_model_name(name) == "tiny" else BOOK_DPO_DEFAULTS


def _book_default(name: str, default: Any) -> Any:
    # TrainConfig's field `name` (help, flag, check) with the book's DPO default.
    base = next(f for f in fields(TrainConfig) if f.name == name)
    return field(default=default, metadata=base.metadata)


@dataclass(frozen=True)
class DPOConfig(TrainConfig):
    """DPO's hyper-parameters: TrainConfig with the book's DPO defaults, and beta.

    The book: 1 epoch, learning rate 5e-6, weight decay 0.01, beta 0.1, evaluation every 5
    steps on 5 batches. A resume refuses a changed beta like any other hyper-parameter.
    """

    num_epochs: int = _book_default("num_epochs", 1)
    lr: float = _book_default("lr", 5e-6)
    weight_decay: float = _book_default("weight_decay", 0.01)
    beta: float = setting(
        0.1, "DPO beta: how far the policy may move from the reference", positive_number
    )


def state_fingerprint(model: nn.Module) -> str:
    """sha256 of every tensor of the state dict, in key order: equal iff the weights are."""
    digest = hashlib.sha256()
    for key, tensor in sorted(model.state_dict().items()):
        digest.update(key.encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def _pair_tokens(batch: Mapping[str, Any]) -> int:
    return batch["chosen"].numel() + batch["rejected"].numel()


def _chosen_tokens(batch: Mapping[str, Any]) -> int:
    return batch["chosen"].numel()  # the book's tokens_seen counts the chosen rows only


def _dpo_line(row: Mapping[str, Any]) -> str:
    # The course's rewards are beta x log-ratio: say so, the book's numbers are 1/beta larger.
    return (
        f"Train loss {row['train_loss']:.3f}, Val loss {row['val_loss']:.3f}, "
        f"{COURSE_REWARDS.margin_label}: train {row['train_reward_margin']:.3f}, "
        f"val {row['val_reward_margin']:.3f}"
    )


def _book_line(row: Mapping[str, Any]) -> str:
    # The book's own line; its "reward margins" are log-ratio margins (no beta).
    return (
        f"Train loss {row['train_loss']:.3f}, Val loss {row['val_loss']:.3f}, "
        f"Train reward margins {row['train_logratio_margin']:.3f}, "
        f"Val reward margins {row['val_logratio_margin']:.3f}"
    )


def dpo_objective(reference: nn.Module, beta: float, *, chapter_compat: bool = False) -> Objective:
    """DPO against the frozen `reference` as `train`'s objective.

    The loss of a batch is `dpo_loss_batch`; each evaluation gives the loss, the chosen and
    rejected rewards and the reward margin on `eval_iter` batches of the training and of
    the validation pairs (`history_columns(chapter_compat)`). `chapter_compat=True`: the
    book's rewards (log-ratio, no beta), its log line and its tokens_seen (chosen rows
    only). A checkpoint records the reference's fingerprint: a resume against another
    reference model is refused.
    """

    def batch_loss(policy: nn.Module, batch: Any, device: torch.device) -> torch.Tensor:
        loss, _, _ = dpo_loss_batch(batch, policy, reference, beta, device)
        return loss

    def evaluate(
        policy: nn.Module, train: DataLoader[Any], val: DataLoader[Any], device: Any, eval_iter: int
    ) -> dict[str, float]:
        row: dict[str, float] = {}
        with eval_mode(policy):
            for split, loader in (("train", train), ("val", val)):
                res = dpo_loss_loader(
                    loader,
                    policy,
                    reference,
                    beta,
                    device,
                    eval_iter,
                    chapter_compat=chapter_compat,
                )
                row.update({f"{split}_{k}": v for k, v in res.items()})
        return row

    return Objective(
        name="DPO",
        batch_loss=batch_loss,
        batch_tokens=_chosen_tokens if chapter_compat else _pair_tokens,
        evaluate=evaluate,
        columns=tuple(history_columns(chapter_compat)),
        describe=_book_line if chapter_compat else _dpo_line,
        identity={"reference model": state_fingerprint(reference)[:16]},
    )


def train_dpo(
    policy: nn.Module,
    reference: nn.Module,
    train_loader: DataLoader[Any],
    val_loader: DataLoader[Any],
    *,
    config: DPOConfig | None = None,
    options: RunOptions | None = None,
    device: str | torch.device | None = None,
    resume_from: str | os.PathLike[str] | None = None,
    callback: Callable[[pd.DataFrame], None] | None = None,
    chapter_compat: bool = False,
) -> pd.DataFrame:
    """Train `policy` with DPO against the frozen `reference`; returns the history.

    Columns: step, epoch, tokens_seen, then loss, chosen/rejected reward and reward margin
    for the train and the validation pairs (`eval_iter` batches each, every `eval_freq`
    steps): the rewards are beta x log-ratio, or with `chapter_compat=True` the book's
    log-ratio (`history_columns`; use it with `make_preference_loaders(chapter_compat=True)`).
    `options` (helpers.run.train_config.RunOptions) as for fine-tuning: with
    `checkpoint_dir` a checkpoint is written at the end, periodically and on Ctrl-C, SIGTERM
    or SIGHUP, and `resume_from` continues from one exactly; `max_steps` stops early
    (resumable). `callback(history)` runs after every evaluation (e.g. a live plot).
    `history.attrs` holds the `steps` and `tokens_seen` so far.
    """
    config = config or DPOConfig()
    device = torch.device(device) if device is not None else next(policy.parameters()).device
    freeze_reference(reference.to(device), copy_model=False)
    try:
        return train(
            policy,
            train_loader,
            val_loader,
            config=config,
            options=options,
            device=device,
            resume_from=resume_from,
            callback=callback,
            objective=dpo_objective(reference, config.beta, chapter_compat=chapter_compat),
        )
    finally:
        policy.eval()
