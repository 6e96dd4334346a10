"""The named extensions of the training loop in helpers.train, one small piece each.

Epoch seeding (exact resume), bf16 autocast, NaN checks, gradient accumulation and clipping,
early stopping, signal handling (Ctrl-C, SIGTERM, SIGHUP) and checkpoints (`RunCheckpointer`:
the run's snapshots, the free-space check, periodic saves). `train` reads as the chapter's
loop that calls them.
"""

from __future__ import annotations

import contextlib
import math
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from helpers.batching import loader_generators
from helpers.run.checkpoints import (
    Checkpoint,
    CheckpointError,
    DiskFullError,
    TrainState,
    check_resumable,
    checkpoint_bytes,
    data_fingerprint,
    file_bytes,
    load_checkpoint,
    remove_stale_temp_files,
    restore_rng_state,
    save_checkpoint,
    space_needed,
    weights_bytes,
)
from helpers.run.train_config import RunOptions, TrainConfig
from helpers.runtime import check_output_dir
from helpers.widgets.progress import tqdm


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C, SIGTERM or SIGHUP stopped `train`; `checkpoint` is what it saved (or None)."""

    def __init__(self, signal_name: str = "SIGINT", checkpoint: Path | None = None, step: int = 0):
        super().__init__(signal_name)
        self.signal_name, self.checkpoint, self.step = signal_name, checkpoint, step


def interrupted_report(exc: KeyboardInterrupt) -> tuple[str, int]:
    """A command line's message after `exc` stopped training, and its exit code (128 + signal)."""
    name = exc.signal_name if isinstance(exc, TrainingInterrupted) else "SIGINT"
    code = 128 + int(getattr(signal, name, signal.SIGINT))
    if isinstance(exc, TrainingInterrupted) and exc.checkpoint is not None:
        # Say --resume only when there is something to resume from.
        return (
            f"Interrupted ({name}) at step {exc.step}: checkpoint saved in {exc.checkpoint}; "
            "rerun with --resume to continue.",
            code,
        )
    return "Interrupted; no checkpoint was saved.", code


@contextlib.contextmanager
def deterministic_mode(enabled: bool) -> Iterator[None]:
    """With `enabled` (RunOptions.deterministic): one thread and PyTorch's deterministic kernels.

    Several threads split a sum differently with their number, so runs agree bit for bit only
    at the same thread count; one thread (and no non-deterministic GPU kernels) makes every
    run of the same settings, resumed or not, identical. Both settings are restored after.
    """
    if not enabled:
        yield
        return
    threads, before = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    # cuBLAS is deterministic only with a fixed workspace (CUDA >= 10.2); torch checks for it.
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(before, warn_only=warn_only)


def autocast(device: torch.device, enabled: bool) -> contextlib.AbstractContextManager[Any]:
    """bf16 autocast when enabled on CUDA (where it speeds training up); otherwise nothing."""
    if enabled and device.type == "cuda":
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def epoch_batches(
    loader: DataLoader[Any], state: TrainState, seed: int, generators: list[torch.Generator]
) -> Iterator[Any]:
    """The epoch's batches from where `state` stands, in the order an uninterrupted run saw."""
    if getattr(loader, "chapter_order", False):
        # Chapter-faithful loaders draw from torch's global RNG, which the chapter seeds once
        # before training (123) and then lets run on: seed at the start only. Later epochs
        # follow the chapter's order, so such a run resumes exactly only within epoch 1.
        if state.epoch == 0:
            torch.manual_seed(seed)
            batches = _skip(iter(loader), state.batches)
            if state.batches:  # the global RNG as it was, so epoch 2 follows the same order
                restore_rng_state(state.rng, generators)
            return batches
        if state.batches:
            raise CheckpointError(
                "cannot resume a chapter-faithful run (make_loaders(chapter_compat=True)) after "
                "its first epoch: its shuffling follows torch's global random state"
            )
        return iter(loader)
    # Each epoch's order depends only on (seed, epoch), so a resumed run replays it: this
    # replaces the seed the loader was built with, and resets the global torch RNG too.
    torch.manual_seed(seed + state.epoch)
    for gen in generators:
        gen.manual_seed(seed + state.epoch)
    batches = _skip(iter(loader), state.batches)
    if state.batches:
        restore_rng_state(state.rng, generators)
    return batches


def _skip(batches: Iterator[Any], n: int) -> Iterator[Any]:
    for _ in range(n):  # a resumed run skips what the checkpoint had done
        next(batches)
    return batches


def check_finite(loss: float, what: str, step: int, state: TrainState) -> None:
    """Raise FloatingPointError naming the step if `loss` (of `step`'s evaluation) is not finite."""
    if not math.isfinite(loss):
        raise FloatingPointError(
            f"{what} is {loss} at the evaluation of step {step} (epoch "
            f"{state.epoch + 1}); lower the learning rate or check the data"
        )


class LossWatch:
    """Training losses kept on the device and checked for NaN/inf in one go, not every step.

    `float(loss)` after every batch would make the CPU wait for the GPU each step; the
    check runs at evaluations, checkpoints and epoch ends and still names the first bad batch.
    """

    def __init__(self) -> None:
        self.losses: list[torch.Tensor] = []
        self.where: list[tuple[int, int, int]] = []  # (step, epoch, batch) of each loss

    def add(self, loss: torch.Tensor, state: TrainState) -> None:
        """Remember `loss` of the batch `state` is about to count (for step `state.step`)."""
        self.losses.append(loss.detach())
        self.where.append((state.step, state.epoch + 1, state.batches + 1))

    def check(self) -> None:
        """Raise FloatingPointError naming the first non-finite loss since the last check."""
        if not self.losses:
            return
        finite = torch.isfinite(torch.stack(self.losses).float())
        if not bool(finite.all()):  # the one host synchronisation
            first = int((~finite).nonzero()[0])
            step, epoch, batch = self.where[first]
            raise FloatingPointError(
                f"training loss is {float(self.losses[first])} at step {step} (epoch {epoch}, "
                f"batch {batch}); lower the learning rate or check the data"
            )
        self.losses.clear()
        self.where.clear()


def step_due(state: TrainState, config: TrainConfig, epoch_batches: int) -> bool:
    """Gradient accumulation: True once `grad_accum_steps` batches (or the epoch's last) are in."""
    return state.batches % config.grad_accum_steps == 0 or state.batches == epoch_batches


def finish_gradients(model: torch.nn.Module, state: TrainState, config: TrainConfig) -> None:
    """Gradients ready for the optimizer step: short accumulation group rescaled, then clipped."""
    # Gradient accumulation: the epoch's last group may be short; scale it to its own size.
    short = state.batches % config.grad_accum_steps
    if short:
        for p in model.parameters():
            if p.grad is not None:
                p.grad.mul_(config.grad_accum_steps / short)
    if config.max_grad_norm is not None:
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.max_grad_norm)


def update_early_stopping(state: TrainState, config: TrainConfig, model: torch.nn.Module) -> None:
    """Record a new best validation loss (and its weights) or count one more bad evaluation."""
    if config.early_stopping_patience is None:
        return
    row = state.history[-1]
    if row["val_loss"] < state.best_val_loss - config.early_stopping_min_delta:
        state.best_val_loss, state.best_step, state.bad_evals = row["val_loss"], int(row["step"]), 0
        state.best_weights = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    else:
        state.bad_evals += 1
        state.stopped_early = state.bad_evals >= config.early_stopping_patience


def pending_evaluation(state: TrainState, config: TrainConfig) -> int | None:
    """The step whose evaluation a resumed run still owes, or None.

    Evaluations come after steps 0, eval_freq, 2 * eval_freq, ... (one history row each),
    and a snapshot is taken between an optimizer step and its evaluation: the next
    evaluation due is owed if its step is already done.
    """
    due = len(state.history) * config.eval_freq
    return due if due < state.step else None


class StopSignals:
    """Ctrl-C, SIGTERM, SIGHUP while training: the first stops at the next batch, a second at once.

    Stopping between batches keeps the weights those of the last snapshot, so the checkpoint
    saved on the way out resumes exactly. Previous handlers come back on exit.
    """

    NAMES = ("SIGINT", "SIGTERM", "SIGHUP")

    def __init__(self, enabled: bool) -> None:
        main = threading.current_thread() is threading.main_thread()  # signals need it
        self.enabled = enabled and main
        self.received: str | None = None
        self.previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        if self.received is not None:
            raise TrainingInterrupted(signal.Signals(signum).name)
        self.received = signal.Signals(signum).name

    def check(self) -> None:
        """Raise TrainingInterrupted if a signal asked to stop."""
        if self.received is not None:
            raise TrainingInterrupted(self.received)

    def __enter__(self) -> StopSignals:
        if self.enabled:
            for name in self.NAMES:
                if hasattr(signal, name):
                    signum = getattr(signal, name)
                    self.previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)


def _batching(loader: DataLoader[Any]) -> dict[str, Any]:
    # How examples become batches (collate_fn's options, e.g. mask_prompt), minus the device.
    options = getattr(loader.collate_fn, "keywords", {})
    return {"batch_size": loader.batch_size, **{k: v for k, v in options.items() if k != "device"}}


class RunCheckpointer:
    """The run's snapshots and checkpoints: every N steps or minutes, on a stop and at the end.

    A snapshot is the run's state taken right after an optimizer step (with the random
    states), so it matches the weights until the next step changes them; only a snapshot
    is ever saved. Before training: stale temp files of a killed writer are removed and the
    folder is checked for writability and free space.
    """

    def __init__(
        self,
        options: RunOptions,
        config: TrainConfig,
        parts: dict[str, Any],
        watch: LossWatch,
        objective: Mapping[str, str],
    ) -> None:
        self.options, self.config, self.parts, self.watch = options, config, parts, watch
        self.objective = dict(objective)
        self.generators = loader_generators(parts["loaders"][0])  # the shuffling's RNGs
        self.snapshot: TrainState | None = None
        self.last_save = time.monotonic()
        self.error: str | None = None  # the last failed save, reported in the history attrs
        self.saved_step: int | None = None  # the step of the last good checkpoint of this run
        self._fingerprint: str | None = None
        if options.checkpoint_dir is not None:
            remove_stale_temp_files(options.checkpoint_dir)
            # Fail now, not after hours of training (OutputDirError, one line).
            early = config.early_stopping_patience is not None
            needed = checkpoint_bytes(parts["model"], early_stopping=early)
            check_output_dir(options.checkpoint_dir, needed)
            self._data()  # the data fingerprint now, not during a Ctrl-C

    def start(self, resume_from: str | os.PathLike[str] | None) -> TrainState:
        """The run's first state: a new one, or the checkpoint's (loaded into the parts)."""
        state = TrainState() if resume_from is None else self._resume(resume_from)
        self.snapshot = replace(state, history=list(state.history))
        return state

    def _resume(self, path: str | os.PathLike[str]) -> TrainState:
        # Load a checkpoint into the model, optimizer and scheduler after checking it fits.
        model = self.parts["model"]
        ckpt = load_checkpoint(path, type(self.config))
        data = self._data()
        check_resumable(ckpt, model=model, config=self.config, objective=self.objective, **data)
        model.load_state_dict(ckpt.model)
        self.parts["optimizer"].load_state_dict(ckpt.optimizer)
        self.parts["scheduler"].load_state_dict(ckpt.scheduler)
        self.saved_step = ckpt.state.step
        return ckpt.state

    def weights_changing(self) -> None:
        """The optimizer is about to change the weights: no snapshot matches them until `take`."""
        self.snapshot = None

    def take(self, state: TrainState) -> None:
        """Snapshot `state` (and the random states) right after an optimizer step."""
        self.snapshot = state.snapshot(self.generators)

    def identity(self) -> dict[str, Any]:
        """What a resume compares besides the weights: objective, hyper-parameters, data."""
        return {"objective": self.objective, "config": asdict(self.config), **self._data()}

    def _data(self) -> dict[str, Any]:
        if self._fingerprint is None:  # computed once: it reads every example
            loaders = self.parts["loaders"]
            datasets = [loader.dataset for loader in loaders]
            sized = all(hasattr(d, "__len__") for d in datasets)
            batching = [_batching(loader) for loader in loaders]
            self._fingerprint = data_fingerprint(datasets, batching) if sized else ""
        return {
            "train_batches": len(self.parts["loaders"][0]),
            "data_fingerprint": self._fingerprint,
        }

    def save(self, *, check: bool = True) -> Path | None:
        """Write the snapshot with the current weights; a failed save is reported, not raised.

        With `check`, pending training losses are checked first (a NaN raises instead).
        """
        if check:
            self.watch.check()
        snapshot = self.snapshot
        if self.options.checkpoint_dir is None or snapshot is None or snapshot.step == 0:
            return None
        parts = self.parts
        ckpt = Checkpoint(
            model=parts["model"].state_dict(),
            optimizer=parts["optimizer"].state_dict(),
            scheduler=parts["scheduler"].state_dict(),
            state=snapshot,
            config=self.config,
            objective=self.objective,
            **self._data(),
        )
        try:
            path = save_checkpoint(self.options.checkpoint_dir, ckpt)
        except DiskFullError as exc:  # training on could not be saved: stop now
            raise self._disk_full(exc) from exc
        except CheckpointError as exc:  # e.g. a folder made read-only: training goes on
            self.error = str(exc)
            tqdm.write(f"warning: {exc}", file=sys.stderr)
            return None
        self.last_save = time.monotonic()
        self.saved_step = snapshot.step
        return path

    def _disk_full(self, exc: DiskFullError) -> DiskFullError:
        """The error that stops a run whose checkpoint no longer fits: what to free, what is kept.

        The space named is what a rerun needs there: a checkpoint (written beside the one it
        replaces) and then the model file, which is what the course's command lines write.
        """
        model_file = weights_bytes(self.parts["model"])
        needed = space_needed(exc.needed, model_file=model_file, existing=file_bytes(exc.folder))
        free_more = f"free at least {max(needed - exc.free, 0) / 2**20:.0f} MiB there"
        total = f"about {needed / 2**20:.0f} MiB in all, for the checkpoint and the model file"
        if self.saved_step is None:
            kept = f"training stopped before any checkpoint was saved: {free_more} ({total})"
            advice = "and rerun"
        else:
            kept = (
                f"training stopped; the last good checkpoint (step {self.saved_step}) is "
                f"intact: {free_more} ({total})"
            )
            advice = "and rerun with --resume"
        return DiskFullError(
            f"{exc}; {kept} {advice}", folder=exc.folder, free=exc.free, needed=needed
        )

    def periodic(self) -> None:
        """Save when `checkpoint_every` steps or `checkpoint_minutes` minutes call for it."""
        if self.snapshot is None:
            return
        every, minutes = self.options.checkpoint_every, self.options.checkpoint_minutes
        by_steps = every is not None and self.snapshot.step % every == 0
        by_time = minutes is not None and time.monotonic() - self.last_save >= minutes * 60
        if by_steps or by_time:
            self.save()

    def interrupted(self, exc: KeyboardInterrupt, state: TrainState) -> TrainingInterrupted:
        """Save what can be saved after Ctrl-C or a signal; the exception that says so."""
        name = exc.args[0] if isinstance(exc, TrainingInterrupted) else "SIGINT"
        step = self.snapshot.step if self.snapshot is not None else state.step
        try:
            saved = self.save(check=False)
        except DiskFullError as full:  # stopping anyway: say why nothing new was saved
            tqdm.write(f"warning: {full}", file=sys.stderr)
            saved = None
        return TrainingInterrupted(name, saved, step)
