"""The chapter's training loop (`train`), with the extensions a real fine-tuning run needs.

`train` is the chapter's `train_model_simple` (AdamW, evaluate every `eval_freq` steps on
`eval_iter` batches, something to look at after each epoch) plus small named extensions
(helpers.run.train_extensions): gradient accumulation and clipping, a warmup + cosine
schedule, bf16 autocast on CUDA, early stopping, NaN checks, signal handling and checkpoints
for an exact resume (the format lives in helpers.run.checkpoints). Settings come from
`TrainConfig` (hyper-parameters) and `RunOptions` (progress, logging, checkpoints), both in
helpers.run.train_config. What is minimised is an `Objective`: by default the chapter's
next-token loss (`next_token_objective`); DPO (helpers.dpo.train) brings its own.
Launched by `torchrun`, the same loop trains data-parallel (helpers.run.distributed): each
rank takes its rows of every batch, and the numbers are those of one process.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import pandas as pd
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from helpers.batching import IGNORE_INDEX
from helpers.model import eval_mode
from helpers.run.checkpoints import CHAPTER_OBJECTIVE, TrainState
from helpers.run.distributed import (
    DistributedError,
    Ranks,
    all_finite,
    batch_rows,
    check_same,
    current,
    data_parallel,
    first_signal,
    gradient_sync,
    ignoring_signals,
    loss_scale,
    peer_failure,
    rank_rows,
    split_evaluation,
    worker_options,
)
from helpers.run.train_config import RunOptions, TrainConfig, lr_factor
from helpers.run.train_extensions import (
    LossWatch,
    RunCheckpointer,
    StopSignals,
    TrainingInterrupted,
    autocast,
    check_finite,
    deterministic_mode,
    epoch_batches,
    finish_gradients,
    pending_evaluation,
    step_due,
    update_early_stopping,
)
from helpers.tokenizer import EOS_ID
from helpers.widgets.progress import tqdm

HISTORY_COLUMNS = ["step", "epoch", "tokens_seen", "train_loss", "val_loss", "lr"]
EpochEndCallback = Callable[[torch.nn.Module, int], Any]
HistoryCallback = Callable[[pd.DataFrame], Any]
# evaluate(model, train_loader, val_loader, device, eval_iter) -> metrics (see Objective)
Evaluation = Callable[
    [torch.nn.Module, DataLoader[Any], DataLoader[Any], torch.device, int], dict[str, float]
]


def calc_loss_batch(
    input_batch: torch.Tensor, target_batch: torch.Tensor, model: torch.nn.Module, device: Any
) -> torch.Tensor:
    """Mean cross-entropy of one batch; targets equal to -100 (padding, masked prompt) are ignored."""
    input_batch, target_batch = input_batch.to(device), target_batch.to(device)
    logits = model(input_batch)  # (B, T, V)
    return torch.nn.functional.cross_entropy(
        logits.flatten(0, 1), target_batch.flatten(), ignore_index=IGNORE_INDEX
    )


def _first_batches(data_loader: DataLoader[Any], num_batches: int) -> Iterator[Any]:
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
    data_loader: DataLoader[Any],
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
    train_loader: DataLoader[Any],
    val_loader: DataLoader[Any],
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


@dataclass(frozen=True)
class Objective:
    """What `train` minimises, and how it evaluates and logs it (the chapter's: see below).

    `batch_loss(model, batch, device)` is the loss of one training batch (it is
    back-propagated); `batch_tokens(batch)` counts its tokens for `tokens_seen`.
    `evaluate(model, train_loader, val_loader, device, eval_iter)` returns the metrics of one
    evaluation (in eval mode), at least `train_loss` and `val_loss` (early stopping and the
    NaN checks read them); the history keeps `columns` of them plus step, epoch,
    tokens_seen and lr, and `describe(row)` is the log line after "Ep 1 (Step 000000): ".
    A checkpoint records `name` and `identity` (e.g. DPO's reference model) and resumes
    only a run with the same.

    Under torchrun each rank's `batch_loss` gets its rows of the batch, and is weighted by
    its share of `batch_weight(batch)`, what the loss is a mean over (default: the rows);
    each rank's `evaluate` gets its share of the evaluated batches, so its train_* and
    val_* metrics must be means over batches (helpers.run.distributed.split_evaluation).
    """

    name: str  # also the progress bar's label
    batch_loss: Callable[[torch.nn.Module, Any, torch.device], torch.Tensor]
    batch_tokens: Callable[[Any], int]
    evaluate: Evaluation
    columns: tuple[str, ...]
    describe: Callable[[Mapping[str, Any]], str]
    identity: Mapping[str, str] = field(default_factory=dict)
    batch_weight: Callable[[Any], float] = batch_rows

    def record(self) -> dict[str, str]:
        """What a checkpoint records of the objective (a resume must match it)."""
        return {"name": self.name, **self.identity}


def _next_token_loss(model: torch.nn.Module, batch: Any, device: torch.device) -> torch.Tensor:
    input_batch, target_batch = batch
    return calc_loss_batch(input_batch, target_batch, model, device)


def _input_tokens(batch: Any) -> int:
    return batch[0].numel()


def _target_tokens(batch: Any) -> int:
    # What calc_loss_batch's mean is over: the targets it does not ignore.
    return int((batch[1] != IGNORE_INDEX).sum())


def _losses_line(row: Mapping[str, Any]) -> str:
    return f"Train loss {row['train_loss']:.3f}, Val loss {row['val_loss']:.3f}"


def next_token_objective(*, batched: bool = False) -> Objective:
    """The chapter's objective: next-token cross-entropy, evaluated by `evaluate_model`.

    `batched`: each split's evaluation in one forward pass (RunOptions.eval_batched).
    """

    def evaluate(
        model: torch.nn.Module,
        train: DataLoader[Any],
        val: DataLoader[Any],
        device: Any,
        eval_iter: int,
    ) -> dict[str, float]:
        train_loss, val_loss = evaluate_model(model, train, val, device, eval_iter, batched=batched)
        return {"train_loss": train_loss, "val_loss": val_loss}

    return Objective(
        name=CHAPTER_OBJECTIVE,
        batch_loss=_next_token_loss,
        batch_tokens=_input_tokens,
        evaluate=evaluate,
        columns=tuple(HISTORY_COLUMNS),
        describe=_losses_line,
        batch_weight=_target_tokens,
    )


def _history_frame(state: TrainState, columns: tuple[str, ...]) -> pd.DataFrame:
    df = pd.DataFrame(state.history, columns=list(columns))
    found = state.best_step >= 0
    df.attrs.update(
        steps=state.step,
        tokens_seen=state.tokens_seen,
        stopped_early=bool(state.stopped_early),
        best_step=int(state.best_step) if found else None,
        best_val_loss=float(state.best_val_loss) if found else None,
    )
    return df


@dataclass
class _Run:
    """One call of `train`: what the chapter's loop keeps in local variables, and the extensions."""

    model: torch.nn.Module
    train_loader: DataLoader[Any]
    val_loader: DataLoader[Any]
    device: torch.device
    config: TrainConfig
    options: RunOptions
    objective: Objective
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    checkpointer: RunCheckpointer
    watch: LossWatch
    callback: HistoryCallback | None
    state: TrainState = field(default_factory=TrainState)
    bar: Any = None  # the progress bar
    ranks: Ranks = field(default_factory=Ranks)  # a single process unless under torchrun
    trainer: torch.nn.Module | None = None  # what trains: `model`, or its DDP wrapper

    def finished(self) -> bool:
        """All epochs done, stopped early, or `options.max_steps` reached."""
        state, max_steps = self.state, self.options.max_steps
        return (
            state.epoch >= self.config.num_epochs
            or state.stopped_early
            or (max_steps is not None and state.step >= max_steps)
        )

    def epoch_batches(self) -> Iterator[Any]:
        """The epoch's batches in its seeded order; after a resume, from where it stopped."""
        batches = epoch_batches(
            self.train_loader, self.state, self.config.seed, self.checkpointer.generators
        )
        owed = pending_evaluation(self.state, self.config)
        if owed is not None:  # resumed between an optimizer step and its evaluation
            self.evaluate(owed)
        return batches

    def batch_loss(self, batch: Any) -> torch.Tensor:
        """The loss to back-propagate: the batch's, or this rank's weighted share of it."""
        if not self.ranks.active:
            loss = self.objective.batch_loss(self.model, batch, self.device)
            self.watch.add(loss, self.state)  # checked for NaN at evaluations, epoch ends...
            return loss
        rows = rank_rows(batch, self.ranks)
        loss = self.objective.batch_loss(self.trainer or self.model, rows, self.device)
        mine = self.objective.batch_weight(rows)
        if mine:  # rows without a target: a NaN mean with weight 0 (its gradient is 0)
            self.watch.add(loss, self.state)
        return loss * loss_scale(mine, self.objective.batch_weight(batch), self.ranks)

    def train_step(self, batch: Any) -> int | None:
        """The chapter's batch body: loss, backward, optimizer step.

        Returns the 0-based number of the optimizer step it took, or None when the batch
        only added its gradients (gradient accumulation).
        """
        state, config = self.state, self.config
        with autocast(self.device, config.bf16):
            loss = self.batch_loss(batch)
        state.batches += 1
        state.tokens_seen += self.objective.batch_tokens(batch)  # the global batch's
        due = step_due(state, config, len(self.train_loader))
        with gradient_sync(self.trainer or self.model, due):  # DDP: all-reduce when due
            (loss / config.grad_accum_steps).backward()
        if not due:
            return None  # accumulate more micro-batches before the optimizer step
        finish_gradients(self.model, state, config)
        self.checkpointer.weights_changing()
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad()
        step = state.step  # this optimizer step's 0-based number (the chapter's global_step)
        state.step += 1
        self.checkpointer.take(state)  # the one snapshot point: before the evaluation
        self.bar.update(1)
        return step

    def evaluate(self, step: int) -> None:
        """The chapter's evaluation after `step`: a history row, the 'Ep ...' line, early stop."""
        all_finite(self.watch.check, self.ranks)  # the training losses since the last one
        state, model = self.state, self.model
        with autocast(self.device, self.config.bf16):
            metrics = split_evaluation(  # under torchrun: split between the ranks
                self.objective.evaluate,
                model,
                (self.train_loader, self.val_loader),
                self.device,
                self.config.eval_iter,
            )
        check_finite(metrics["val_loss"], "validation loss", step, state)
        check_finite(metrics["train_loss"], "training loss (evaluation)", step, state)
        values = {
            "step": step,
            "epoch": state.epoch + state.batches / len(self.train_loader),
            "tokens_seen": state.tokens_seen,
            "lr": self.optimizer.param_groups[0]["lr"],
            **metrics,
        }
        state.history.append({name: values[name] for name in self.objective.columns})
        if self.options.log_evals:
            tqdm.write(f"Ep {state.epoch + 1} (Step {step:06d}): {self.objective.describe(values)}")
        self.bar.set_postfix(train=f"{metrics['train_loss']:.3f}", val=f"{metrics['val_loss']:.3f}")
        update_early_stopping(state, self.config, model)
        if self.callback is not None and self.ranks.main:
            self.callback(self.history())

    def end_epoch(self, on_epoch_end: EpochEndCallback | None) -> None:
        """After the epoch's last batch: NaN check, next epoch, the chapter's sample (rank 0)."""
        all_finite(self.watch.check, self.ranks)
        self.state.epoch, self.state.batches = self.state.epoch + 1, 0
        if on_epoch_end is not None and self.ranks.main:
            on_epoch_end(self.model, self.state.epoch)

    def check_stop(self, stop: StopSignals) -> None:
        """Stop between batches after Ctrl-C, SIGTERM or SIGHUP; every rank at the same one."""
        stop.received = first_signal(stop.received, self.ranks)
        stop.check()

    def loop(self, stop: StopSignals, on_epoch_end: EpochEndCallback | None) -> None:
        """The chapter's loop over epochs and batches, with the extensions' hooks."""
        trainer = self.trainer or self.model
        while not self.finished():  # the chapter: for epoch in range(num_epochs)
            trainer.train()
            for batch in self.epoch_batches():
                self.check_stop(stop)
                step = self.train_step(batch)
                if step is None:
                    continue  # gradient accumulation: more micro-batches first
                if step % self.config.eval_freq == 0:
                    self.evaluate(step)
                self.checkpointer.periodic()
                if self.finished():
                    break
            else:  # the epoch ran to its end
                self.end_epoch(on_epoch_end)
        all_finite(self.watch.check, self.ranks)  # before the last checkpoint

    def peer_failure(self, exc: RuntimeError) -> DistributedError | None:
        """Another rank died (a distributed run): save what rank 0 can; the one-line error."""
        with ignoring_signals():  # torchrun's SIGTERM to the survivors: report and save first
            failure = peer_failure(exc, self.ranks)
            # The snapshot is whole: the ranks' steps are in lockstep.
            saved = self.checkpointer.save(check=False) if failure is not None else None
        if failure is None:
            return None
        if saved is not None:
            return DistributedError(f"{failure}; checkpoint saved in {saved}: rerun with --resume")
        return failure

    def history(self) -> pd.DataFrame:
        """The history so far as a DataFrame (see `train`)."""
        return _history_frame(self.state, self.objective.columns)

    def finish(self, stop: StopSignals) -> pd.DataFrame:
        """Save the last snapshot, keep the best weights (early stopping); the history."""
        # Saved before restoring the best weights, so a resumed run (e.g. with more epochs)
        # continues the real trajectory with matching optimizer state.
        saved = self.checkpointer.save()
        if stop.received:  # a signal during the last step: the run is complete, but stop
            raise TrainingInterrupted(stop.received, saved, self.state.step)
        if self.state.best_weights is not None:  # the best validation loss, as the chapter advises
            self.model.load_state_dict(self.state.best_weights)
        history = self.history()
        history.attrs["checkpoint_error"] = self.checkpointer.error
        return history


def _objective(objective: Objective | None, options: RunOptions) -> Objective:
    if objective is None:
        return next_token_objective(batched=options.eval_batched)
    if options.eval_batched:
        raise ValueError("RunOptions.eval_batched applies to the chapter's objective only")
    return objective


def _start(
    model: torch.nn.Module,
    loaders: tuple[DataLoader[Any], DataLoader[Any]],
    device: torch.device,
    config: TrainConfig,
    options: RunOptions,
    objective: Objective,
    callback: HistoryCallback | None,
    resume_from: str | os.PathLike[str] | None,
) -> _Run:
    """The optimizer, schedule, checkpointer and progress bar of a run, resumed if asked."""
    model.to(device)
    total_steps = math.ceil(len(loaders[0]) / config.grad_accum_steps) * config.num_epochs
    optimizer = torch.optim.AdamW(  # fused: one kernel for all parameters on CUDA
        model.parameters(),
        lr=config.lr,
        weight_decay=config.weight_decay,
        fused=device.type == "cuda",
    )
    optimizer.zero_grad()
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, total_steps, config)
    )
    parts = {"model": model, "optimizer": optimizer, "scheduler": scheduler, "loaders": loaders}
    ranks = current()
    options = worker_options(options, ranks)  # only rank 0 writes checkpoints and prints
    watch = LossWatch()
    saver = RunCheckpointer(options, config, parts, watch, objective.record())
    run = _Run(
        model=model,
        train_loader=loaders[0],
        val_loader=loaders[1],
        device=device,
        config=config,
        options=options,
        objective=objective,
        optimizer=optimizer,
        scheduler=scheduler,
        checkpointer=saver,
        watch=watch,
        callback=callback,
        state=saver.start(resume_from),
        ranks=ranks,
    )
    if ranks.active:
        _check_ranks_agree(run, saver)
        run.trainer = data_parallel(model, device)  # copies rank 0's weights to every rank
    shown = min(total_steps, options.max_steps or total_steps)  # the bar's total
    run.bar = tqdm(
        total=shown,
        initial=min(run.state.step, shown),
        desc=objective.name,
        unit="step",
        disable=not options.progress,
    )
    return run


def _check_ranks_agree(run: _Run, saver: RunCheckpointer) -> None:
    """Refuse a distributed run whose ranks have other settings, data, model or start."""
    shapes = [(name, tuple(p.shape), p.requires_grad) for name, p in run.model.named_parameters()]
    check_same(
        "training settings",
        {
            **saver.identity(),
            "max_steps": run.options.max_steps,
            "parameters": shapes,
            "resumed at step": run.state.step,
        },
    )


def train(
    model: torch.nn.Module,
    train_loader: DataLoader[Any],
    val_loader: DataLoader[Any],
    *,
    config: TrainConfig | None = None,
    options: RunOptions | None = None,
    device: str | torch.device | None = None,
    resume_from: str | os.PathLike[str] | None = None,
    callback: HistoryCallback | None = None,
    on_epoch_end: EpochEndCallback | None = None,
    objective: Objective | None = None,
) -> pd.DataFrame:
    """Fine-tune `model`; returns the history (step, epoch, tokens_seen, train/val loss, lr).

    `step` is the chapter's 0-based global step; `epoch` is fractional (epochs done so far).
    `callback(history)` runs after every evaluation (e.g. LiveLossPlot.update) and
    `on_epoch_end(model, epoch)` after each epoch (1-based), e.g. `sample_printer(entry)`.
    History attrs: `steps`, `tokens_seen`, `stopped_early`, `best_step`, `best_val_loss`,
    `checkpoint_error`. Each epoch's shuffling is seeded with `config.seed + epoch` (whatever
    seed the loader was built with), so a resumed run replays the same batches. Ctrl-C,
    SIGTERM and SIGHUP save a checkpoint (with `options.checkpoint_dir`) and raise
    TrainingInterrupted. `objective`: what to minimise (default: the chapter's loss).
    Under torchrun (a joined process group) it trains with DistributedDataParallel: the
    loaders' batches are global, each rank trains on its rows, only rank 0 saves
    checkpoints and calls `callback` and `on_epoch_end`; the others get the same history.
    """
    config, options = config or TrainConfig(), options or RunOptions()
    if len(train_loader) == 0 or len(val_loader) == 0:
        raise ValueError("train() needs non-empty train and validation loaders")
    device = torch.device(device) if device is not None else next(model.parameters()).device
    objective = _objective(objective, options)
    run = _start(
        model, (train_loader, val_loader), device, config, options, objective, callback, resume_from
    )
    try:
        one_thread = deterministic_mode(options.deterministic)
        with run.bar, StopSignals(options.handle_signals) as stop, one_thread:
            run.loop(stop, on_epoch_end)
    except KeyboardInterrupt as exc:
        raise run.checkpointer.interrupted(exc, run.state) from exc
    except RuntimeError as exc:  # under torchrun: did another rank die?
        failure = run.peer_failure(exc)
        if failure is None:
            raise
        raise failure from exc
    return run.finish(stop)
