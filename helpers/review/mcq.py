"""MMLU-style multiple choice: which answer does the model find most likely?

Evaluation harnesses (lm-evaluation-harness, HELM) do not parse generated text for these
benchmarks: they put the question in front of each choice and compare the log-likelihood
the model gives each answer continuation. `mode="letter"` scores " A"/" B"/... after an
"Answer:" cue (the original MMLU set-up); `mode="text"` scores the choice's own words, which
suits small models that never learned the letter convention.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from helpers.model import eval_mode
from helpers.tokenizer import EOS_ID, encode
from helpers.widgets.progress import tqdm

LETTERS = "ABCDEFGH"


@dataclass(frozen=True)
class MCQuestion:
    """A question, its choices, the index of the right one and an optional subject."""

    question: str
    choices: tuple[str, ...]
    answer: int
    subject: str = ""


def _answer_index(value: Any, n_choices: int, where: str) -> int:
    if isinstance(value, str) and len(value.strip()) == 1 and value.strip().upper() in LETTERS:
        idx = LETTERS.index(value.strip().upper())
    elif isinstance(value, int) and not isinstance(value, bool):
        idx = value
    else:
        raise ValueError(f"{where}: answer {value!r} is neither a letter nor a choice index")
    if not 0 <= idx < n_choices:
        raise ValueError(f"{where}: answer {value!r} is outside the {n_choices} choices")
    return idx


def load_mcq(path: str | Path, *, subject: str | None = None) -> list[MCQuestion]:
    """Questions from the project's JSONL (question, choices, answer, subject) or an MMLU CSV."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Question file not found: {path.name}")
    if path.suffix == ".csv":
        questions = _load_csv(path, subject)
    else:
        questions = _load_jsonl(path, subject)
    if not questions:
        raise ValueError(f"{path.name}: no questions")
    return questions


def _load_csv(path: Path, subject: str | None) -> list[MCQuestion]:
    # MMLU's files: no header, columns question, A, B, C, D, answer letter.
    subj = subject or path.stem.replace("_test", "").replace("_dev", "").replace("_", " ")
    questions = []
    with path.open(encoding="utf-8", newline="") as f:
        for n, row in enumerate(csv.reader(f), start=1):
            if len(row) < 4:
                raise ValueError(f"{path.name} row {n}: expected question, choices, answer")
            choices = tuple(row[1:-1])
            idx = _answer_index(row[-1], len(choices), f"{path.name} row {n}")
            questions.append(MCQuestion(row[0], choices, idx, subj))
    return questions


def _load_jsonl(path: Path, subject: str | None) -> list[MCQuestion]:
    questions = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path.name} line {n}"
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{where}: not valid JSON ({exc})") from None
        if not isinstance(rec, dict) or not isinstance(rec.get("question"), str):
            raise ValueError(f"{where}: needs a text field 'question'")
        choices = rec.get("choices")
        if (
            not isinstance(choices, list)
            or len(choices) < 2
            or not all(isinstance(c, str) for c in choices)
        ):
            raise ValueError(f"{where}: 'choices' must be a list of at least two texts")
        idx = _answer_index(rec.get("answer"), len(choices), where)
        subj = rec.get("subject") or subject or ""
        questions.append(MCQuestion(rec["question"], tuple(choices), idx, subj))
    return questions


def mcq_prompt(q: MCQuestion, mode: str = "letter") -> str:
    """The text in front of each choice: MMLU's zero-shot format (letter mode) or question only."""
    if mode == "text":
        return f"Question: {q.question}\nAnswer:"
    head = (
        f"The following is a multiple choice question about {q.subject}.\n\n" if q.subject else ""
    )
    options = "".join(f"{LETTERS[i]}. {c}\n" for i, c in enumerate(q.choices))
    return f"{head}{q.question}\n{options}Answer:"


def continuations(q: MCQuestion, mode: str = "letter") -> list[str]:
    """What is scored after the prompt: ' A', ' B', ... or ' ' + each choice's text."""
    if mode == "letter":
        return [f" {LETTERS[i]}" for i in range(len(q.choices))]
    if mode == "text":
        return [f" {c}" for c in q.choices]
    raise ValueError(f"mode must be 'letter' or 'text', got {mode!r}")


@torch.no_grad()
def choice_logprobs(
    model: torch.nn.Module, prompt: str, options: Sequence[str]
) -> list[tuple[float, int]]:
    """(summed log-probability, token count) of each option continuing `prompt`, one batch.

    Runs in eval mode (no dropout) and puts the model back in the mode it was in.
    """
    context = int(getattr(getattr(model, "cfg", None), "context_length", 1024))
    device = next(model.parameters()).device
    p_ids = encode(prompt)
    rows, spans = [], []
    for opt in options:
        o_ids = encode(opt)
        if not o_ids:
            raise ValueError(f"empty answer option {opt!r}")
        ids = (p_ids + o_ids)[-context:]  # keep the answer; cut the question from the left
        rows.append(ids)
        spans.append(len(o_ids))
    width = max(len(r) for r in rows)
    # Right padding is harmless: a causal model's logits at a position ignore later tokens.
    batch = torch.tensor([r + [EOS_ID] * (width - len(r)) for r in rows], device=device)  # (C, T)
    with eval_mode(model):
        logits = model(batch)  # (C, T, V)
    out = []
    for c, (ids, n) in enumerate(zip(rows, spans, strict=True)):
        start = len(ids) - n  # first answer token; predicted from position start - 1
        targets = torch.tensor(ids[start:], device=device)  # (n,)
        # Normalise only the n positions that predict the answer, not the whole (T, V).
        logp = torch.log_softmax(logits[c, start - 1 : len(ids) - 1].float(), dim=-1)  # (n, V)
        out.append((float(logp.gather(-1, targets[:, None]).sum()), n))
    return out


def evaluate_mcq(
    model: torch.nn.Module,
    questions: Sequence[MCQuestion],
    *,
    mode: str = "letter",
    normalize: str = "sum",
    progress: bool = False,
) -> pd.DataFrame:
    """Score every question; one row each with the predicted and right choice (see `mcq_accuracy`).

    `normalize="sum"` picks the highest total log-likelihood; `"mean"` divides by the
    answer's token count so long choices are not penalised (harnesses' `acc_norm` idea).
    """
    if normalize not in ("sum", "mean"):
        raise ValueError(f"normalize must be 'sum' or 'mean', got {normalize!r}")
    rows = []
    items = tqdm(questions, desc="Multiple choice") if progress else questions
    for q in items:
        scored = choice_logprobs(model, mcq_prompt(q, mode), continuations(q, mode))
        scores = [lp / n if normalize == "mean" else lp for lp, n in scored]
        pred = max(range(len(scores)), key=scores.__getitem__)
        rows.append(
            {
                "subject": q.subject,
                "question": q.question,
                "answer": LETTERS[q.answer],
                "predicted": LETTERS[pred],
                "correct": pred == q.answer,
                "scores": [round(s, 3) for s in scores],
            }
        )
    return pd.DataFrame(rows)


def mcq_accuracy(results: pd.DataFrame) -> float:
    """Share of questions answered correctly (chance is 1 / number of choices)."""
    return float(results["correct"].mean())
