"""The chapter's training loop (`train`), with the extensions a real fine-tuning run needs.

`train` is the chapter's `train_model_simple` (AdamW, evaluate every `eval_freq` steps on
`eval_iter` batches, something to look at after each epoch) plus small named extensions:
gradient accumulation and clipping, a warmup + cosine schedule, bf16 autocast on CUDA, early
stopping, NaN checks, and checkpoints for an exact resume (the format lives in
helpers.run.checkpoints). Settings come from `TrainConfig` (hyper-parameters) and `RunOptions`
(progress, logging, checkpoints), both in helpers.run.train_config.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pandas as pd
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from helpers.batching import IGNORE_INDEX, loader_generators
from helpers.model import eval_mode
from helpers.run.checkpoints import TrainState
from helpers.run.train_config import RunOptions, TrainConfig, lr_factor
from helpers.run.train_extensions import (
    LossWatch,
    RunCheckpointer,
    StopSignals,
    TrainingInterrupted,
    autocast,
    check_finite,
    epoch_batches,
    eval_pending,
    finish_gradients,
    step_due,
    update_early_stopping,
)
from helpers.tokenizer import EOS_ID
from helpers.widgets.progress import tqdm

HISTORY_COLUMNS = ["step", "epoch", "tokens_seen", "train_loss", "val_loss", "lr"]
EpochEndCallback = Callable[[torch.nn.Module, int], Any]


def calc_loss_batch(
    input_batch: torch.Tensor, target_batch: torch.Tensor, model: torch.nn.Module, device: Any
) -> torch.Tensor:
    """Mean cross-entropy of one batch; targets equal to -100 (padding, masked prompt) are ignored."""
    input_batch, target_batch = input_batch.to(device), target_batch.to(device)
    logits = model(input_batch)  # (B, T, V)
    return torch.nn.functional.cross_entropy(
        logits.flatten(0, 1), target_batch.flatten(), ignore_index=IGNORE_INDEX
    )


def _first_batches(data_loader: DataLoader, num_batches: int) -> Iterator[Any]:
    """The loader's first `num_batches` batches, iterated exactly as the chapter's loop does.

    A fresh iterator of a shuffling loader draws from its generator (or torch's global RNG):
    both evaluation paths go through here, so training sees the same batch order either way.
    """
    for i, batch in enumerate(data_loader):
        if i >= num_batches:
            break
        yield batch


def _batched_loss_sum(
    batches: list[tuple[torch.Tensor, torch.Tensor]], model: torch.nn.Module, device: Any
) -> float:
    """Sum of the batches' mean losses from ONE forward pass over all their rows.

    Each batch is padded on the right to the longest one (inputs with <|endoftext|>, targets
    with -100): with causal attention the logits of the positions before the padding do not
    change, and the padded targets are ignored. Each batch's mean is taken over its own
    non-ignored targets (in float64), so the result equals the per-batch loop up to float
    rounding. Memory: the logits of all rows at once, e.g. 5 batches of 8 rows at 300 tokens
    are 40 x 300 x 50257 floats (2.4 GB in fp32, and as much again for the log-softmax)
    instead of 8 rows at a time.
    """
    if not batches:
        return 0.0
    length = max(x.shape[1] for x, _ in batches)
    inputs = torch.cat([F.pad(x, (0, length - x.shape[1]), value=EOS_ID) for x, _ in batches])
    targets = torch.cat(
        [F.pad(y, (0, length - y.shape[1]), value=IGNORE_INDEX) for _, y in batches]
    )
    inputs, targets = inputs.to(device), targets.to(device)
    logits = model(inputs)  # (sum of batch sizes, length, V)
    token_losses = F.cross_entropy(
        logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX, reduction="none"
    ).view(targets.shape)  # 0 where ignored
    sizes = [x.shape[0] for x, _ in batches]
    row_sums = token_losses.sum(dim=1, dtype=torch.float64)
    row_counts = (targets != IGNORE_INDEX).sum(dim=1)
    sums = torch.stack([part.sum() for part in row_sums.split(sizes)])
    counts = torch.stack([part.sum() for part in row_counts.split(sizes)])
    return float((sums / counts).sum())  # the one host synchronisation


def calc_loss_loader(
    data_loader: DataLoader,
    model: torch.nn.Module,
    device: Any,
    num_batches: int | None = None,
    *,
    batched: bool = False,
) -> float:
    """Average batch loss over the loader (or its first `num_batches`); NaN for an empty loader.

    `batched=True` computes the same average (up to float rounding) with one forward pass
    over all the batches, padded to one length (see `_batched_loss_sum`): fewer, larger
    passes, which is faster on a GPU; it holds the logits of all those rows at once.
    """
    if len(data_loader) == 0:
        return float("nan")
    num_batches = len(data_loader) if num_batches is None else min(num_batches, len(data_loader))
    with torch.no_grad():  # evaluation only: no graph needed
        batches = _first_batches(data_loader, num_batches)
        if batched:
            total = _batched_loss_sum(list(batches), model, device)
        else:
            total = sum(calc_loss_batch(x, y, model, device).item() for x, y in batches)
    return total / num_batches


def evaluate_model(
    model: torch.nn.Module,
    train_loader: DataLoader,
    val_loader: DataLoader,
    device: Any,
    eval_iter: int,
    *,
    batched: bool = False,
) -> tuple[float, float]:
    """The chapter's evaluation: train and validation loss on `eval_iter` batches, in eval mode.

    `batched=True`: one forward pass per split instead of one per batch (same losses up to
    float rounding; see `calc_loss_loader`).
    """
    with eval_mode(model):
        train_loss = calc_loss_loader(
            train_loader, model, device, num_batches=eval_iter, batched=batched
        )
        val_loss = calc_loss_loader(
            val_loader, model, device, num_batches=eval_iter, batched=batched
        )
    return train_loss, val_loss


def _history_frame(state: TrainState) -> pd.DataFrame:
    df = pd.DataFrame(state.history, columns=HISTORY_COLUMNS)
    found = state.best_step >= 0
    df.attrs.update(
        stopped_early=bool(state.stopped_early),
        best_step=int(state.best_step) if found else None,
        best_val_loss=float(state.best_val_loss) if found else None,
    )
    return df


@dataclass
class _Evaluator:
    """The chapter's periodic evaluation: a history row, the 'Ep ...' line, early stopping."""

    model: torch.nn.Module
    loaders: tuple[DataLoader, DataLoader]
    device: torch.device
    config: TrainConfig
    options: RunOptions
    optimizer: torch.optim.Optimizer
    callback: Callable[[pd.DataFrame], Any] | None
    watch: LossWatch
    bar: Any = None  # the progress bar, once it exists

    def __call__(self, state: TrainState) -> None:
        self.watch.check()  # the training losses since the last evaluation
        train_loader, val_loader = self.loaders
        with autocast(self.device, self.config.bf16):
            train_loss, val_loss = evaluate_model(
                self.model, train_loader, val_loader, self.device, self.config.eval_iter,
                batched=self.options.eval_batched,
            )  # fmt: skip
        check_finite(val_loss, "validation loss", state)
        check_finite(train_loss, "training loss (evaluation)", state)
        step = state.step - 1  # the chapter's 0-based global step
        values = [step, state.epoch + state.batches / len(train_loader), state.tokens_seen,
                  train_loss, val_loss, self.optimizer.param_groups[0]["lr"]]  # fmt: skip
        state.history.append(dict(zip(HISTORY_COLUMNS, values, strict=True)))
        if self.options.log_evals:
            tqdm.write(
                f"Ep {state.epoch + 1} (Step {step:06d}): "
                f"Train loss {train_loss:.3f}, Val loss {val_loss:.3f}"
            )
        if self.bar is not None:
            self.bar.set_postfix(train=f"{train_loss:.3f}", val=f"{val_loss:.3f}")
        update_early_stopping(state, self.config, self.model)
        if self.callback is not None:
            self.callback(_history_frame(state))


def _optimizer_step(optimizer: torch.optim.Optimizer, scheduler: Any, state: TrainState) -> None:
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad()
    state.step += 1


def train(
    model: torch.nn.Module,
    train_loader: DataLoader,
    val_loader: DataLoader,
    *,
    config: TrainConfig | None = None,
    options: RunOptions | None = None,
    device: str | torch.device | None = None,
    resume_from: str | Path | None = None,
    callback: Callable[[pd.DataFrame], Any] | None = None,
    on_epoch_end: EpochEndCallback | None = None,
) -> pd.DataFrame:
    """Fine-tune `model`; returns the history (step, epoch, tokens_seen, train/val loss, lr).

    `step` is the chapter's 0-based global step; `epoch` is fractional (epochs done so far).
    `callback(history)` runs after every evaluation (e.g. LiveLossPlot.update) and
    `on_epoch_end(model, epoch)` after each epoch (1-based), e.g. `sample_printer(entry)`.
    History attrs: `stopped_early`, `best_step`, `best_val_loss`, `checkpoint_error`.
    Each epoch's shuffling is seeded with `config.seed + epoch` (whatever seed the loader was
    built with), so a resumed run replays the same batches. Ctrl-C, SIGTERM and SIGHUP save a
    checkpoint (with `options.checkpoint_dir`) and raise TrainingInterrupted.
    """
    config, options = config or TrainConfig(), options or RunOptions()
    if len(train_loader) == 0 or len(val_loader) == 0:
        raise ValueError("train() needs non-empty train and validation loaders")
    device = torch.device(device) if device is not None else next(model.parameters()).device
    model.to(device)
    total_steps = math.ceil(len(train_loader) / config.grad_accum_steps) * config.num_epochs
    optimizer = torch.optim.AdamW(  # fused: one kernel for all parameters on CUDA
        model.parameters(), lr=config.lr, weight_decay=config.weight_decay,
        fused=device.type == "cuda",
    )  # fmt: skip
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, total_steps, config)
    )
    gens = loader_generators(train_loader)
    parts = {"model": model, "optimizer": optimizer, "scheduler": scheduler}
    watch = LossWatch()
    saver = RunCheckpointer(
        options, config, {**parts, "loaders": [train_loader, val_loader]}, watch
    )
    evaluate = _Evaluator(model, (train_loader, val_loader), device=device, config=config,
                          options=options, optimizer=optimizer, callback=callback, watch=watch)  # fmt: skip
    state = saver.resume(resume_from, model) if resume_from is not None else TrainState()
    # The run at the last optimizer-step boundary: what a checkpoint may save.
    snapshot: TrainState | None = replace(state, history=list(state.history))
    evaluate.bar = bar = tqdm(total=total_steps, initial=min(state.step, total_steps),
                              desc="fine-tuning", unit="step", disable=not options.progress)  # fmt: skip
    try:
        with bar, StopSignals(options.handle_signals) as stop:
            optimizer.zero_grad()
            while state.epoch < config.num_epochs and not state.stopped_early:
                model.train()
                batches = epoch_batches(train_loader, state, config.seed, gens)
                if eval_pending(state, config):  # resumed from a step whose evaluation was due
                    evaluate(state)
                for input_batch, target_batch in batches:
                    stop.check()
                    with autocast(device, config.bf16):
                        loss = calc_loss_batch(input_batch, target_batch, model, device)
                    watch.add(loss, state)  # checked for NaN at evaluations and epoch ends
                    (loss / config.grad_accum_steps).backward()
                    state.batches += 1
                    state.tokens_seen += input_batch.numel()
                    if not step_due(state, config, len(train_loader)):
                        continue  # accumulate more micro-batches before the optimizer step
                    finish_gradients(model, state, config)
                    snapshot = None  # the weights change now: nothing consistent to save
                    _optimizer_step(optimizer, scheduler, state)
                    snapshot = state.snapshot(gens)  # the one snapshot point
                    bar.update(1)
                    if (state.step - 1) % config.eval_freq == 0:
                        evaluate(state)
                    saver.periodic(snapshot)
                    if state.stopped_early:
                        break
                else:  # the epoch ran to its end
                    watch.check()
                    state.epoch, state.batches = state.epoch + 1, 0
                    if on_epoch_end is not None:
                        on_epoch_end(model, state.epoch)
    except KeyboardInterrupt as exc:
        name = exc.args[0] if isinstance(exc, TrainingInterrupted) else "SIGINT"
        step = snapshot.step if snapshot is not None else state.step
        raise TrainingInterrupted(name, saver.save(snapshot, check=False), step) from exc
    # Saved before restoring the best weights, so a resumed run (e.g. with more epochs)
    # continues the real trajectory with matching optimizer state.
    saved = saver.save(snapshot)
    if stop.received:  # a signal during the last step: the run is complete, but stop as asked
        raise TrainingInterrupted(stop.received, saved, state.step)
    if state.best_weights is not None:  # keep the best validation loss, as the chapter advises
        model.load_state_dict(state.best_weights)
    history = _history_frame(state)
    history.attrs["checkpoint_error"] = saver.error
    return history
