"""Batched evaluation (RunOptions.eval_batched): same losses, same training, fewer passes."""

from __future__ import annotations

import math
from typing import Any

import pandas as pd
import pytest
import torch

from helpers.batching import loader_generators, make_loaders
from helpers.config import GPTConfig
from helpers.data import split_data
from helpers.model import GPTModel
from helpers.run.train_config import RunOptions, TrainConfig
from helpers.train import calc_loss_loader, evaluate_model, train


def _model(cfg: GPTConfig, seed: int = 1) -> GPTModel:
    torch.manual_seed(seed)
    return GPTModel(cfg)


def _ragged_batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    # Batches of different sizes and widths, as the chapter's collate makes them.
    g = torch.Generator().manual_seed(0)
    batches = []
    for rows, width in [(4, 7), (3, 12), (4, 5), (2, 9), (1, 5)]:
        x = torch.randint(0, 50257, (rows, width), generator=g)
        y = torch.randint(0, 50257, (rows, width), generator=g)
        y[:, width - 2 :] = -100  # padding
        y[0, :2] = -100  # a masked prompt
        batches.append((x, y))
    _, y = batches[2]
    y[:] = -100
    y[1, 0] = 7  # a batch whose mean is over a single target
    return batches


@pytest.mark.parametrize("num_batches", [1, 2, 3, 5, None])
def test_batched_loss_equals_the_per_batch_loop(
    tiny_config: GPTConfig, num_batches: int | None
) -> None:
    model = _model(tiny_config).eval()
    batches: Any = _ragged_batches()  # a list has len() and iterates like a loader
    plain = calc_loss_loader(batches, model, "cpu", num_batches=num_batches)
    batched = calc_loss_loader(batches, model, "cpu", num_batches=num_batches, batched=True)
    assert batched == pytest.approx(plain, abs=1e-6)


def test_batched_loss_of_a_batch_without_targets_is_nan_as_before(tiny_config: GPTConfig) -> None:
    model = _model(tiny_config).eval()
    x, y = _ragged_batches()[0]
    batches: Any = [(x, torch.full_like(y, -100))]  # a list iterates like a loader
    assert math.isnan(calc_loss_loader(batches, model, "cpu"))
    assert math.isnan(calc_loss_loader(batches, model, "cpu", batched=True))


def test_batched_evaluation_runs_one_forward_pass_per_split(
    tiny_config: GPTConfig, chapter_data: list[dict[str, str]]
) -> None:
    loaders = make_loaders(split_data(chapter_data[:200]), batch_size=4, allowed_max_length=64)
    model = _model(tiny_config)
    calls: list[tuple[int, ...]] = []
    hook = model.register_forward_hook(lambda _m, args, _out: calls.append(tuple(args[0].shape)))
    results = {}
    for batched in (False, True):
        for gen in loader_generators(loaders.train):  # the same shuffled train batches
            gen.manual_seed(5)
        calls.clear()
        results[batched] = evaluate_model(
            model, loaders.train, loaders.validation, "cpu", eval_iter=3, batched=batched
        )
        if not batched:
            assert len(calls) == 6  # the chapter's: one pass per batch
    hook.remove()
    assert [shape[0] for shape in calls] == [12, 10]  # 3 batches per split (4, 4, 2 in val)
    # Chapter rows (up to 64 tokens) in other matrix shapes: the logits differ in the last
    # float32 bit or so (relative ~1e-7 of a loss near 10.8).
    assert results[True] == pytest.approx(results[False], abs=1e-5)
    assert model.training  # eval mode only during the evaluation


def _history(
    tiny_config: GPTConfig,
    chapter_data: list[dict[str, str]],
    *,
    eval_batched: bool,
    **loader_args: Any,
) -> pd.DataFrame:
    loaders = make_loaders(
        split_data(chapter_data[:40]), batch_size=4, allowed_max_length=48, **loader_args
    )
    model = _model(tiny_config)
    config = TrainConfig(num_epochs=3, lr=5e-3, eval_freq=3, eval_iter=2)
    options = RunOptions(progress=False, log_evals=False, eval_batched=eval_batched)
    history = train(model, loaders.train, loaders.validation, config=config, options=options)
    return history, model.state_dict()


@pytest.mark.parametrize(
    "loader_args",
    [{}, {"grouped": True}, {"chapter_compat": True}],
    ids=["seeded", "grouped", "chapter-compat"],
)
def test_train_history_is_the_same_with_batched_evaluation(
    tiny_config: GPTConfig,
    chapter_data: list[dict[str, str]],
    loader_args: dict[Any, Any] | dict[str, bool],
) -> None:
    plain, plain_weights = _history(tiny_config, chapter_data, eval_batched=False, **loader_args)
    batched, batched_weights = _history(tiny_config, chapter_data, eval_batched=True, **loader_args)
    assert plain["epoch"].max() > 2  # evaluations in every epoch, including later ones
    cols = ["step", "epoch", "tokens_seen", "lr"]
    assert batched[cols].equals(plain[cols])  # same steps, same batches (tokens seen)
    for col in ("train_loss", "val_loss"):
        assert batched[col].tolist() == pytest.approx(plain[col].tolist(), abs=1e-5)
    # Evaluation draws from the loaders exactly as before: training saw the same batches.
    for name, tensor in plain_weights.items():
        assert torch.equal(batched_weights[name], tensor), name


def test_eval_batched_option_is_checked() -> None:
    assert RunOptions().eval_batched is False
    with pytest.raises(ValueError, match="eval_batched"):
        RunOptions(eval_batched="yes")  # type: ignore[arg-type]
