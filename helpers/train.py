"""The chapter's training loop, with the options a real fine-tuning run needs.

`train` keeps the chapter's semantics (AdamW, evaluate every `eval_freq` steps on `eval_iter`
batches, a sample response after each epoch) and adds gradient accumulation and clipping, a
warmup + cosine schedule, bf16 autocast on CUDA, early stopping, NaN detection and exact
resume from checkpoints (see helpers.checkpoints).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from helpers.batching import IGNORE_INDEX, loader_generators
from helpers.checkpoints import (
    CheckpointError,
    capture_rng_state,
    load_checkpoint,
    restore_rng_state,
    save_checkpoint,
)
from helpers.model import eval_mode
from helpers.train_config import TrainConfig, lr_factor

__all__ = [
    "TrainConfig",
    "calc_loss_batch",
    "calc_loss_loader",
    "evaluate_model",
    "lr_factor",
    "print_sample",
    "train",
]

HISTORY_COLUMNS = ["step", "epoch", "tokens_seen", "train_loss", "val_loss", "lr"]


def calc_loss_batch(
    input_batch: torch.Tensor, target_batch: torch.Tensor, model: torch.nn.Module, device: Any
) -> torch.Tensor:
    """Mean cross-entropy of one batch; targets equal to -100 (padding, masked prompt) are ignored."""
    input_batch, target_batch = input_batch.to(device), target_batch.to(device)
    logits = model(input_batch)  # (B, T, V)
    return torch.nn.functional.cross_entropy(
        logits.flatten(0, 1), target_batch.flatten(), ignore_index=IGNORE_INDEX
    )


def calc_loss_loader(
    data_loader: DataLoader, model: torch.nn.Module, device: Any, num_batches: int | None = None
) -> float:
    """Average batch loss over the loader (or its first `num_batches`); NaN for an empty loader."""
    if len(data_loader) == 0:
        return float("nan")
    num_batches = len(data_loader) if num_batches is None else min(num_batches, len(data_loader))
    total = 0.0
    with torch.no_grad():  # evaluation only: no graph needed
        for i, (input_batch, target_batch) in enumerate(data_loader):
            if i >= num_batches:
                break
            total += calc_loss_batch(input_batch, target_batch, model, device).item()
    return total / num_batches


def evaluate_model(
    model: torch.nn.Module,
    train_loader: DataLoader,
    val_loader: DataLoader,
    device: Any,
    eval_iter: int,
) -> tuple[float, float]:
    """The chapter's evaluation: train and validation loss on `eval_iter` batches, in eval mode."""
    with eval_mode(model):
        train_loss = calc_loss_loader(train_loader, model, device, num_batches=eval_iter)
        val_loss = calc_loss_loader(val_loader, model, device, num_batches=eval_iter)
    return train_loss, val_loss


def _seed_epoch(loader: DataLoader, seed: int, epoch: int) -> None:
    # Each epoch's order depends only on (seed, epoch), so a resumed run can replay it.
    torch.manual_seed(seed + epoch)
    for gen in loader_generators(loader):
        gen.manual_seed(seed + epoch)


def _autocast(device: torch.device, enabled: bool) -> contextlib.AbstractContextManager:
    if enabled and device.type == "cuda":
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _split_loaders(loaders: Any, val_loader: DataLoader | None) -> tuple[DataLoader, DataLoader]:
    # Accept helpers.batching.Loaders (train, validation, test) or the chapter's two loaders.
    if val_loader is None and hasattr(loaders, "train") and hasattr(loaders, "validation"):
        return loaders.train, loaders.validation
    if val_loader is None:
        raise TypeError("train() needs a validation loader (or a Loaders tuple with .validation)")
    return loaders, val_loader


def print_sample(
    model: torch.nn.Module, entry: Mapping[str, str], style: str, max_new_tokens: int
) -> str:
    """Greedy response of `model` to `entry`, printed on one line as the chapter does."""
    from helpers.generate import generate_responses  # lazy: keeps training importable alone

    with eval_mode(model):
        text = generate_responses(
            model, [dict(entry)], style=style, max_new_tokens=max_new_tokens, progress=False
        )[0]
    print("Sample response:", text.replace("\n", " "))
    return text


def train(
    model: torch.nn.Module,
    loaders: Any,
    val_loader: DataLoader | None = None,
    *,
    config: TrainConfig | None = None,
    device: str | torch.device | None = None,
    resume_from: str | Path | None = None,
    sample_entry: Mapping[str, str] | None = None,
    style: str = "alpaca",
    callback: Callable[[pd.DataFrame], None] | None = None,
) -> pd.DataFrame:
    """Fine-tune `model`; returns the history (step, epoch, tokens_seen, train/val loss, lr).

    `loaders` is a Loaders tuple or the train DataLoader (then pass `val_loader`). `step` is
    the chapter's 0-based global step; `epoch` is fractional (epochs completed so far).
    `callback(history)` runs after every evaluation (e.g. LiveLossPlot.update). History attrs
    record `stopped_early`, `best_step` and `best_val_loss`. On Ctrl-C a checkpoint is saved
    (if `checkpoint_dir` is set) before the KeyboardInterrupt propagates. Each epoch starts
    with `torch.manual_seed(config.seed + epoch)` (so a resumed run replays the same batch
    order): this resets the caller's global torch random state too.
    """
    config = config or TrainConfig()
    train_loader, val_loader = _split_loaders(loaders, val_loader)
    if len(train_loader) == 0:
        raise ValueError("the training loader is empty")
    device = torch.device(device) if device is not None else next(model.parameters()).device
    model.to(device)
    steps_per_epoch = math.ceil(len(train_loader) / config.grad_accum_steps)
    total_steps = steps_per_epoch * config.num_epochs
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=config.lr, weight_decay=config.weight_decay
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, total_steps, config)
    )
    gens = loader_generators(train_loader)
    # Run position, all of which goes into a checkpoint.
    pos = {"step": 0, "epoch": 0, "batches": 0, "tokens_seen": 0}
    history: list[dict] = []
    early = {
        "best_val": math.inf,
        "best_step": -1,
        "bad_evals": 0,
        "best_state": None,
        "stopped": False,
    }
    snapshot: dict | None = None  # state at the last optimizer-step boundary (for Ctrl-C)

    if resume_from is not None:
        ckpt = load_checkpoint(resume_from, map_location="cpu")
        saved = TrainConfig.from_dict(ckpt.get("config", {}))
        for name in ("seed", "grad_accum_steps", "eval_freq", "eval_iter"):
            if getattr(saved, name) != getattr(config, name):
                raise CheckpointError(
                    f"cannot resume: {name}={getattr(config, name)!r} but the checkpoint used "
                    f"{getattr(saved, name)!r}"
                )
        if ckpt.get("train_batches") != len(train_loader):
            raise CheckpointError(
                f"cannot resume: the train loader has {len(train_loader)} batches, the checkpoint "
                f"was made with {ckpt.get('train_batches')}"
            )
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        pos = {k: int(ckpt[k]) for k in ("step", "epoch", "batches", "tokens_seen")}
        history = [dict(row) for row in ckpt["history"]]
        early.update(ckpt.get("early", {}))

    def take_snapshot() -> dict:
        # Everything a resume needs that changes during a step; the weights are saved
        # from the model itself, which only changes inside optimizer.step().
        return {
            "pos": dict(pos),
            "rng": capture_rng_state(gens),
            "n_history": len(history),
            "early": dict(early),
        }

    def state_for_checkpoint(snap: dict) -> dict:
        return {
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            **snap["pos"],
            "rng": snap["rng"],
            "history": [dict(row) for row in history[: snap["n_history"]]],
            "early": snap["early"],
            "config": asdict(config),
            "train_batches": len(train_loader),
            "model_config": model.cfg.to_dict() if hasattr(model, "cfg") else {},
        }

    def checkpoint(snap: dict) -> None:
        if config.checkpoint_dir is not None:
            save_checkpoint(config.checkpoint_dir, state_for_checkpoint(snap))

    def evaluate() -> None:
        with _autocast(device, config.bf16):
            train_loss, val_loss = evaluate_model(
                model, train_loader, val_loader, device, config.eval_iter
            )
        step = pos["step"] - 1  # the chapter's 0-based global step
        row = {
            "step": step,
            "epoch": pos["epoch"] + pos["batches"] / len(train_loader),
            "tokens_seen": pos["tokens_seen"],
            "train_loss": train_loss,
            "val_loss": val_loss,
            "lr": optimizer.param_groups[0]["lr"],
        }
        history.append(row)
        if config.log_evals:
            tqdm.write(
                f"Ep {pos['epoch'] + 1} (Step {step:06d}): "
                f"Train loss {train_loss:.3f}, Val loss {val_loss:.3f}"
            )
        if config.early_stopping_patience is not None:
            if val_loss < early["best_val"] - config.early_stopping_min_delta:
                early.update(best_val=val_loss, best_step=step, bad_evals=0)
                early["best_state"] = {
                    k: v.detach().cpu().clone() for k, v in model.state_dict().items()
                }
            else:
                early["bad_evals"] += 1
                early["stopped"] = early["bad_evals"] >= config.early_stopping_patience
        if callback is not None:
            callback(pd.DataFrame(history, columns=HISTORY_COLUMNS))

    model.train()
    bar = tqdm(
        total=total_steps,
        initial=min(pos["step"], total_steps),
        desc="fine-tuning",
        disable=not config.progress,
        unit="step",
    )
    try:
        while pos["epoch"] < config.num_epochs and not early["stopped"]:
            epoch = pos["epoch"]
            _seed_epoch(train_loader, config.seed, epoch)
            batches: Iterator = iter(train_loader)
            skip = pos["batches"]
            for _ in range(skip):  # replay the epoch's order up to where the checkpoint was
                next(batches)
            if skip:
                restore_rng_state(ckpt["rng"], gens)
            # A run interrupted after a step but before its evaluation evaluates first.
            if (
                pos["step"]
                and (pos["step"] - 1) % config.eval_freq == 0
                and (not history or history[-1]["step"] != pos["step"] - 1)
            ):
                evaluate()
            snapshot = take_snapshot()
            micro = 0
            optimizer.zero_grad()
            for input_batch, target_batch in batches:
                with _autocast(device, config.bf16):
                    loss = calc_loss_batch(input_batch, target_batch, model, device)
                if not torch.isfinite(loss):
                    raise FloatingPointError(
                        f"training loss is {loss.item()} at step {pos['step']} (epoch {epoch + 1}, "
                        f"batch {pos['batches'] + 1}); lower the learning rate or check the data"
                    )
                (loss / config.grad_accum_steps).backward()
                pos["batches"] += 1
                pos["tokens_seen"] += input_batch.numel()
                micro += 1
                if micro < config.grad_accum_steps and pos["batches"] < len(train_loader):
                    continue
                if micro < config.grad_accum_steps:  # a short last group: scale to its size
                    for p in model.parameters():
                        if p.grad is not None:
                            p.grad.mul_(config.grad_accum_steps / micro)
                if config.max_grad_norm is not None:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), config.max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad()
                micro = 0
                pos["step"] += 1
                snapshot = take_snapshot()
                bar.update(1)
                if (pos["step"] - 1) % config.eval_freq == 0:
                    evaluate()
                    bar.set_postfix(
                        train=f"{history[-1]['train_loss']:.3f}",
                        val=f"{history[-1]['val_loss']:.3f}",
                    )
                snapshot = take_snapshot()
                if config.checkpoint_every and pos["step"] % config.checkpoint_every == 0:
                    checkpoint(snapshot)
                if early["stopped"]:
                    break
            if early["stopped"]:
                break
            pos.update(epoch=epoch + 1, batches=0)
            snapshot = take_snapshot()
            if sample_entry is not None:
                print_sample(model, sample_entry, style, config.sample_max_new_tokens)
                snapshot = take_snapshot()
    except KeyboardInterrupt:
        if snapshot is not None and config.checkpoint_dir is not None:
            checkpoint(snapshot)
            tqdm.write(
                f"Interrupted: checkpoint saved at step {snapshot['pos']['step']}; resume_from it to continue"
            )
        raise
    finally:
        bar.close()
    if snapshot is not None:
        # Saved before restoring the best weights, so a resumed run (e.g. with more epochs)
        # continues the real trajectory with matching optimizer state.
        checkpoint(snapshot)
    if config.early_stopping_patience is not None and early["best_state"] is not None:
        # Keep the weights of the best validation loss, as the chapter advises by hand.
        model.load_state_dict(early["best_state"])
    df = pd.DataFrame(history, columns=HISTORY_COLUMNS)
    df.attrs.update(
        stopped_early=bool(early["stopped"]),
        best_step=int(early["best_step"]) if early["best_step"] >= 0 else None,
        best_val_loss=float(early["best_val"]) if early["best_step"] >= 0 else None,
    )
    return df
