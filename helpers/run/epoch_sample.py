"""The chapter's per-epoch sample response, as an `on_epoch_end` callback for `train`.

    history = train(model, train_loader, val_loader, on_epoch_end=sample_printer(entry))

Kept apart from helpers.train so that training does not depend on generation.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch

from helpers.generate import GenerationSettings, generate_responses

# The chapter's generate_and_print_sample (chapter 5, reused by chapter 7) writes 50 greedy
# tokens.
SAMPLE_SETTINGS = GenerationSettings(max_new_tokens=50)


def print_sample(
    model: torch.nn.Module,
    entry: Mapping[str, str],
    settings: GenerationSettings = SAMPLE_SETTINGS,
) -> str:
    """The response of `model` to `entry`, printed on one line as the chapter does.

    Generation runs in eval mode and leaves the model in the mode it was in.
    """
    text = generate_responses(
        model,  # type: ignore[arg-type]  # any GPT-style module that returns logits
        [dict(entry)],
        settings,
        progress=False,
    )[0]
    print("Sample response:", text.replace("\n", " "))
    return text


def sample_printer(
    entry: Mapping[str, str], settings: GenerationSettings = SAMPLE_SETTINGS
) -> Callable[[torch.nn.Module, int], str]:
    """An `on_epoch_end(model, epoch)` callback that prints the model's response to `entry`."""

    def on_epoch_end(model: torch.nn.Module, epoch: int) -> str:
        return print_sample(model, entry, settings)

    return on_epoch_end
