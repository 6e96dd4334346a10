"""The DPO training loop: policy from the instruction model, frozen reference, exact resume.

`train_dpo` follows the book's `train_model_dpo_simple` (AdamW with a small learning rate,
one epoch, beta 0.1, evaluation every 5 steps on 5 batches) and the course's conventions: a
tqdm bar, a pandas history, and atomic checkpoints that resume to the same weights and
history. `DPOConfig` holds a run's settings, `dpo_run_defaults` the book's or the tiny
preset's. Checkpoint files and the resume checks are in helpers.dpo.checkpoints;
`plot_dpo_history` (loss and reward-margin curves) is in helpers.dpo.outputs.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import pandas as pd
import torch
from torch import nn
from torch.utils.data import DataLoader

from helpers.batching import loader_generators
from helpers.config import resolve_model_name
from helpers.dpo.checkpoints import (
    capture_rng,
    check_resume,
    load_dpo_checkpoint,
    restore_rng,
    save_dpo_checkpoint,
    state_fingerprint,
)
from helpers.dpo.loss import dpo_loss_batch, dpo_loss_loader, freeze_reference
from helpers.model import eval_mode
from helpers.widgets.progress import tqdm

METRICS = ("loss", "chosen_reward", "rejected_reward", "reward_margin")
HISTORY_COLUMNS = [
    "step",
    "epoch",
    "tokens_seen",
    *(f"{split}_{m}" for split in ("train", "val") for m in METRICS),
]


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
    limit=None, lr=5e-6, batch_size=8, max_length=1024, eval_freq=5, eval_iter=5,
    max_new_tokens=256,
)  # fmt: skip
# tiny (random init, two CPU cores): 60 pairs in batches of 4 (12 steps in about a minute) and
# a learning rate large enough to move a small random model visibly in that many steps.
TINY_DPO_DEFAULTS = DPORunDefaults(
    limit=60, lr=1e-3, batch_size=4, max_length=128, eval_freq=4, eval_iter=2, max_new_tokens=32
)


def dpo_run_defaults(name: str) -> DPORunDefaults:
    """The DPO settings for preset `name`: TINY_DPO_DEFAULTS for tiny, else the book's."""
    return TINY_DPO_DEFAULTS if resolve_model_name(name) == "tiny" else BOOK_DPO_DEFAULTS


@dataclass(frozen=True)
class DPOConfig:
    """The book's DPO settings; `max_steps` stops early (with a checkpoint) e.g. to resume."""

    num_epochs: int = 1
    lr: float = 5e-6
    weight_decay: float = 0.01
    beta: float = 0.1
    eval_freq: int = 5
    eval_iter: int = 5
    seed: int = 123
    max_steps: int | None = None
    checkpoint_dir: str | None = None
    checkpoint_every: int | None = None
    progress: bool = True
    log_evals: bool = True


class _Run:
    """State of one training run, split into small steps for readability."""

    def __init__(
        self, policy, reference, train_loader, val_loader, config, device, callback
    ) -> None:
        self.policy, self.reference, self.config, self.device = policy, reference, config, device
        self.callback = callback
        self.train_loader, self.val_loader = train_loader, val_loader
        self.optimizer = torch.optim.AdamW(
            policy.parameters(), lr=config.lr, weight_decay=config.weight_decay
        )
        self.gens = loader_generators(train_loader)
        self.pos = {"step": 0, "epoch": 0, "batches": 0, "tokens_seen": 0}
        self.history: list[dict] = []
        self.reference_print = state_fingerprint(reference)
        self.pending_rng: dict | None = None
        self.snap = self.snapshot()

    def resume(self, path: str | os.PathLike) -> None:
        ckpt = load_dpo_checkpoint(path)
        check_resume(ckpt, asdict(self.config), len(self.train_loader), self.reference_print)
        self.policy.load_state_dict(ckpt["policy"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.pos = {k: int(ckpt["pos"][k]) for k in self.pos}
        self.history = [dict(row) for row in ckpt["history"]]
        self.pending_rng = ckpt["rng"]
        # Saved again as it is if there is nothing left to train (e.g. a finished run).
        self.snap = {"pos": dict(self.pos), "rng": ckpt["rng"], "n": len(self.history)}

    def snapshot(self) -> dict[str, Any]:
        return {"pos": dict(self.pos), "rng": capture_rng(self.gens), "n": len(self.history)}

    def save(self, snap: dict[str, Any]) -> None:
        if self.config.checkpoint_dir is None:
            return
        state = {
            "policy": self.policy.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "pos": snap["pos"],
            "rng": snap["rng"],
            "history": [dict(row) for row in self.history[: snap["n"]]],
            "config": asdict(self.config),
            "train_batches": len(self.train_loader),
            "reference": self.reference_print,
        }
        save_dpo_checkpoint(self.config.checkpoint_dir, state)

    def evaluate(self) -> None:
        c = self.config
        row: dict[str, Any] = {
            "step": self.pos["step"] - 1,  # the book's 0-based global step
            "epoch": self.pos["epoch"] + self.pos["batches"] / len(self.train_loader),
            "tokens_seen": self.pos["tokens_seen"],
        }
        with eval_mode(self.policy):
            for split, loader in (("train", self.train_loader), ("val", self.val_loader)):
                res = dpo_loss_loader(
                    loader, self.policy, self.reference, c.beta, self.device, c.eval_iter
                )
                row.update({f"{split}_{k}": v for k, v in res.items()})
        self.history.append(row)
        if self.callback is not None:
            self.callback(self.frame())
        if c.log_evals:
            tqdm.write(
                f"Ep {int(row['epoch'] - 1e-9) + 1} (Step {row['step']:06d}): "
                f"Train loss {row['train_loss']:.3f}, Val loss {row['val_loss']:.3f}, "
                f"Train margin {row['train_reward_margin']:.3f}, "
                f"Val margin {row['val_reward_margin']:.3f}"
            )

    def frame(self) -> pd.DataFrame:
        return pd.DataFrame(self.history, columns=HISTORY_COLUMNS)

    def needs_eval(self) -> bool:
        step = self.pos["step"] - 1
        done = bool(self.history) and self.history[-1]["step"] == step
        return step >= 0 and step % self.config.eval_freq == 0 and not done

    def done(self) -> bool:
        max_steps = self.config.max_steps
        finished = self.pos["epoch"] >= self.config.num_epochs
        return finished or (max_steps is not None and self.pos["step"] >= max_steps)

    def train_step(self, batch: dict[str, Any]) -> None:
        self.optimizer.zero_grad()
        loss, _, _ = dpo_loss_batch(
            batch, self.policy, self.reference, self.config.beta, self.device
        )
        if not torch.isfinite(loss):
            raise FloatingPointError(
                f"DPO loss is {loss.item()} at step {self.pos['step']}; lower the learning rate"
            )
        loss.backward()
        self.optimizer.step()
        self.pos["step"] += 1
        self.pos["batches"] += 1
        self.pos["tokens_seen"] += batch["chosen"].numel() + batch["rejected"].numel()
        if self.pos["batches"] == len(self.train_loader):
            self.pos["epoch"] += 1
            self.pos["batches"] = 0

    def run_epoch(self, bar: Any) -> None:
        epoch_seed = self.config.seed + self.pos["epoch"]
        torch.manual_seed(epoch_seed)  # each epoch's order depends on (seed, epoch) only
        for gen in self.gens:
            gen.manual_seed(epoch_seed)
        batches = iter(self.train_loader)
        for _ in range(self.pos["batches"]):  # replay the order up to the checkpoint
            next(batches)
        if self.pending_rng is not None and self.pos["batches"]:
            restore_rng(self.pending_rng, self.gens)
        self.pending_rng = None
        self.snap = self.snapshot()
        if self.needs_eval():  # interrupted between a step and its evaluation
            self.evaluate()
            self.snap = self.snapshot()
        for batch in batches:
            self.train_step(batch)
            # The weights just changed: this is the resume point, before the evaluation.
            self.snap = self.snapshot()
            bar.update(1)
            if self.needs_eval():
                self.evaluate()
                self.snap = self.snapshot()
            every = self.config.checkpoint_every
            if every and self.pos["step"] % every == 0:
                self.save(self.snap)
            if self.done():
                break


def train_dpo(
    policy: nn.Module,
    reference: nn.Module,
    train_loader: DataLoader,
    val_loader: DataLoader,
    *,
    config: DPOConfig | None = None,
    device: str | torch.device | None = None,
    resume_from: str | os.PathLike | None = None,
    callback: Callable[[pd.DataFrame], None] | None = None,
) -> pd.DataFrame:
    """Train `policy` with DPO against the frozen `reference`; returns the history.

    Columns: step, epoch, tokens_seen, then loss, chosen/rejected reward and reward margin
    for the train and the validation pairs (`eval_iter` batches each, every `eval_freq`
    steps). With `config.checkpoint_dir` a checkpoint is written at the end (and every
    `checkpoint_every` steps, and on Ctrl-C); `resume_from` continues from one exactly.
    `callback(history)` runs after every evaluation (e.g. a live plot). `history.attrs`
    holds the `steps` and `tokens_seen` so far.
    """
    config = config or DPOConfig()
    if len(train_loader) == 0:
        raise ValueError("the training loader is empty")
    device = torch.device(device) if device is not None else next(policy.parameters()).device
    policy.to(device)
    freeze_reference(reference.to(device), copy_model=False)
    run = _Run(policy, reference, train_loader, val_loader, config, device, callback)
    if resume_from is not None:
        run.resume(resume_from)
    total = len(train_loader) * config.num_epochs
    if config.max_steps is not None:
        total = min(total, config.max_steps)
    bar = tqdm(total=total, initial=min(run.pos["step"], total), desc="DPO", unit="step",
               disable=not config.progress)  # fmt: skip
    policy.train()
    try:
        while not run.done():
            run.run_epoch(bar)
    except KeyboardInterrupt:
        run.save(run.snap)  # the last step boundary: --resume continues from there
        raise
    finally:
        bar.close()
        policy.eval()
    run.save(run.snap)
    history = run.frame()
    history.attrs.update(steps=run.pos["step"], tokens_seen=run.pos["tokens_seen"])
    return history
