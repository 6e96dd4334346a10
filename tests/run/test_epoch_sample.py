"""The per-epoch sample prints the model's answer, the course's way or the chapter's."""

from __future__ import annotations

import pytest
import torch

from helpers.config import GPTConfig
from helpers.generate import GenerationSettings, generate_responses
from helpers.model import GPTModel
from helpers.run.epoch_sample import sample_printer

ENTRY = {"instruction": "Name a primary color.", "input": "", "output": "Red."}


@pytest.mark.parametrize("chapter_compat", [False, True])
def test_sample_is_the_models_answer(
    tiny_config: GPTConfig, capsys: pytest.CaptureFixture[str], chapter_compat: bool
) -> None:
    torch.manual_seed(0)
    model = GPTModel(tiny_config).train()
    settings = GenerationSettings(max_new_tokens=8, chapter_compat=chapter_compat)
    want = generate_responses(model, [ENTRY], settings, progress=False)[0]
    got = sample_printer(ENTRY, settings)(model, 0)
    assert got == want
    assert capsys.readouterr().out == "Sample response: " + want.replace("\n", " ") + "\n"
    assert model.training  # back in the mode it was in
