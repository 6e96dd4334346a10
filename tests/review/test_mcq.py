"""Multiple-choice scoring by log-likelihood: file formats, exact log-probs, picking the answer."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import pytest
import torch

from helpers.config import GPTConfig
from helpers.model import GPTModel
from helpers.review.mcq import (
    MCQuestion,
    choice_logprobs,
    continuations,
    evaluate_mcq,
    load_mcq,
    mcq_accuracy,
    mcq_prompt,
)
from helpers.tokenizer import encode

SAMPLE = Path(__file__).resolve().parents[2] / "data" / "mcq_sample.jsonl"


class Biased(torch.nn.Module):
    """Wraps a model and adds `strength` to the logits of chosen tokens: a model made to prefer them."""

    def __init__(self, model: GPTModel, token_ids: Iterable[int], strength: float = 20.0) -> None:
        super().__init__()
        self.model, self.cfg = model, model.cfg
        self.bias = torch.zeros(model.cfg.vocab_size)
        self.bias[list(token_ids)] = strength

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model(ids) + self.bias  # (B, T, V)


@pytest.fixture()
def model(tiny_config: GPTConfig) -> GPTModel:
    torch.manual_seed(0)
    return GPTModel(tiny_config).eval()


def test_sample_file_loads() -> None:
    qs = load_mcq(SAMPLE)
    assert len(qs) == 20
    assert qs[0] == MCQuestion(
        "What is the capital of France?", ("Berlin", "Madrid", "Paris", "Rome"), 2, "geography"
    )
    assert len({q.answer for q in qs}) == 4  # right answers spread over A-D


def test_mmlu_csv_format(tmp_path: Path) -> None:
    csv_path = tmp_path / "high_school_physics_test.csv"
    csv_path.write_text(
        '"What is 1, plus 1?",1,2,3,4,B\nWhich is a noble gas?,Helium,Iron,Carbon,Sodium,A\n'
    )
    qs = load_mcq(csv_path)
    assert qs[0] == MCQuestion("What is 1, plus 1?", ("1", "2", "3", "4"), 1, "high school physics")
    assert qs[1].answer == 0
    assert mcq_prompt(qs[0]) == (
        "The following is a multiple choice question about high school physics.\n\n"
        "What is 1, plus 1?\nA. 1\nB. 2\nC. 3\nD. 4\nAnswer:"
    )
    assert continuations(qs[0]) == [" A", " B", " C", " D"]
    assert continuations(qs[0], "text") == [" 1", " 2", " 3", " 4"]
    csv_path.write_text("Q,a,b,c,d,E\n")
    with pytest.raises(ValueError, match="row 1: answer 'E' is outside the 4 choices"):
        load_mcq(csv_path)


def test_bad_jsonl_names_the_line(tmp_path: Path) -> None:
    p = tmp_path / "q.jsonl"
    p.write_text(
        '{"question": "q", "choices": ["a", "b"], "answer": "A"}\n{"question": "q", "choices": "ab", "answer": 0}\n'
    )
    with pytest.raises(ValueError, match="q.jsonl line 2: 'choices' must be a list"):
        load_mcq(p)


def test_choice_logprobs_equal_a_manual_forward(model: GPTModel) -> None:
    prompt, options = "Question: Is the sky blue?\nAnswer:", [" Yes", " No, it is green"]
    got = choice_logprobs(model, prompt, options)
    for (lp, n), opt in zip(got, options, strict=True):
        p_ids, o_ids = encode(prompt), encode(opt)
        ids = torch.tensor([p_ids + o_ids])
        with torch.no_grad():
            logp = torch.log_softmax(model(ids)[0], -1)  # (T, V)
        manual = sum(logp[len(p_ids) - 1 + k, t].item() for k, t in enumerate(o_ids))
        assert n == len(o_ids)
        assert lp == pytest.approx(manual, abs=1e-4)


def test_picks_the_answer_the_model_is_made_to_prefer(model: GPTModel) -> None:
    qs = load_mcq(SAMPLE)
    for normalize, subset in (("sum", qs), ("mean", qs[:5])):
        for q in subset:
            # Boost the right answer's tokens that none of its wrong choices use.
            right = set(encode(" " + q.choices[q.answer]))
            wrong = {t for i, c in enumerate(q.choices) if i != q.answer for t in encode(" " + c)}
            res = evaluate_mcq(Biased(model, right - wrong), [q], mode="text", normalize=normalize)
            assert res.loc[0, "predicted"] == "ABCD"[q.answer], q.question
    # Letter mode: a model that always prefers " C" answers C everywhere.
    always_c = evaluate_mcq(Biased(model, encode(" C")), qs, mode="letter")
    assert set(always_c["predicted"]) == {"C"}
    assert mcq_accuracy(always_c) == sum(q.answer == 2 for q in qs) / len(qs)


def test_mean_normalisation_divides_by_token_count(model: GPTModel) -> None:
    q = MCQuestion("Pick one.", ("yes", "a much longer answer text"), 0)
    res_sum = evaluate_mcq(model, [q], mode="text", normalize="sum")
    res_mean = evaluate_mcq(model, [q], mode="text", normalize="mean")
    lengths = [len(encode(c)) for c in continuations(q, "text")]
    for s, m, n in zip(res_sum.loc[0, "scores"], res_mean.loc[0, "scores"], lengths, strict=True):
        assert m == pytest.approx(s / n, abs=2e-3)


def test_scoring_runs_without_dropout_and_restores_training_mode(tiny_config: GPTConfig) -> None:
    from dataclasses import replace

    torch.manual_seed(0)
    model = GPTModel(replace(tiny_config, drop_rate=0.5)).train()
    q = MCQuestion("Pick one.", ("yes", "no"), 0)
    first = evaluate_mcq(model, [q], mode="text").loc[0, "scores"]
    assert model.training  # put back as it was
    assert evaluate_mcq(model, [q], mode="text").loc[0, "scores"] == first  # no dropout noise
