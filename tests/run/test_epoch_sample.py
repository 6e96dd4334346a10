"""The per-epoch sample prints the model's answer, the course's way or the chapter's."""

from __future__ import annotations

import pytest
import torch

from helpers.generate import generate_responses
from helpers.model import GPTModel
from helpers.run.epoch_sample import sample_printer

ENTRY = {"instruction": "Name a primary color.", "input": "", "output": "Red."}


@pytest.mark.parametrize("chapter_compat", [False, True])
def test_sample_is_the_models_answer(tiny_config, capsys, chapter_compat):
    torch.manual_seed(0)
    model = GPTModel(tiny_config).train()
    want = generate_responses(model, [ENTRY], max_new_tokens=8, progress=False,
                              chapter_compat=chapter_compat)[0]  # fmt: skip
    got = sample_printer(ENTRY, max_new_tokens=8, chapter_compat=chapter_compat)(model, 0)
    assert got == want
    assert capsys.readouterr().out == "Sample response: " + want.replace("\n", " ") + "\n"
    assert model.training  # back in the mode it was in
