"""DPO (helpers.dpo.loss): pair collation and masks, tokenization, log-probabilities and the loss
against hand-computed values; chapter-faithful mode against the book's collate, its printed
batches and its rewards. The training loop is in test_train.py, the command line in
test_cli.py."""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from helpers.data import split_data
from helpers.dpo.loss import (
    BOOK_REWARDS,
    PairExample,
    PreferenceDataset,
    collate_pairs,
    compute_dpo_loss,
    dpo_loss_loader,
    make_preference_loaders,
    sequence_logprobs,
    tokenize_pair,
)
from helpers.prompts import format_input, format_prompt
from helpers.tokenizer import EOS_ID, decode, encode

PAD = 0


def test_collate_pads_to_one_width_and_masks_prompt_and_padding() -> None:
    batch = [
        PairExample(prompt=[5, 6], chosen=[5, 6, 7, 8], rejected=[5, 6, 9]),
        PairExample(prompt=[1, 2, 3], chosen=[1, 2, 3, 4, 4], rejected=[1, 2, 3, 7]),
    ]
    out = collate_pairs(batch, pad_token_id=PAD)
    assert [p.tolist() for p in out["prompt"]] == [[5, 6], [1, 2, 3]]
    assert torch.equal(out["chosen"], torch.tensor([[5, 6, 7, 8, 0], [1, 2, 3, 4, 4]]))
    assert torch.equal(out["rejected"], torch.tensor([[5, 6, 9, 0, 0], [1, 2, 3, 7, 0]]))
    T, F = True, False
    assert torch.equal(out["chosen_mask"], torch.tensor([[F, F, T, T, F], [F, F, F, T, T]]))
    assert torch.equal(out["rejected_mask"], torch.tensor([[F, F, T, F, F], [F, F, F, T, F]]))

    kept = collate_pairs(batch, pad_token_id=PAD, mask_prompt=False)
    assert torch.equal(kept["chosen_mask"], torch.tensor([[T, T, T, T, F], [T, T, T, T, T]]))

    with pytest.warns(UserWarning, match="item 1 has no (chosen|rejected) answer token left"):
        cut = collate_pairs(batch, pad_token_id=PAD, allowed_max_length=3)
    assert torch.equal(cut["chosen"], torch.tensor([[5, 6, 7], [1, 2, 3]]))
    assert torch.equal(cut["rejected_mask"], torch.tensor([[F, F, T], [F, F, F]]))


def test_collate_warns_when_truncation_leaves_no_answer_and_rejects_bad_items() -> None:
    batch = [PairExample(prompt=[1, 2, 3], chosen=[1, 2, 3, 4], rejected=[1, 2, 3, 5])]
    with pytest.warns(UserWarning, match="no (chosen|rejected) answer token left") as caught:
        collate_pairs(batch, allowed_max_length=3)
    assert len(caught) == 2  # chosen and rejected
    with pytest.raises(ValueError, match="empty"):
        collate_pairs([])
    with pytest.raises(ValueError, match="shorter than its prompt"):
        collate_pairs([PairExample([1, 2, 3], [1, 2], [1, 2, 3, 4])])


def test_tokenize_pair_shares_the_inference_prompt() -> None:
    entry = {"instruction": "Name a color.", "input": "", "chosen": "Blue.", "rejected": "No."}
    ex = tokenize_pair(entry)
    assert ex.prompt == encode(format_prompt(entry))
    assert ex.chosen == ex.prompt + encode("Blue.") and ex.rejected == ex.prompt + encode("No.")
    assert PreferenceDataset([entry])[0] == ex


def test_sequence_logprobs_by_hand() -> None:
    # Vocabulary of 3; logits chosen so the log-softmax values are easy to write down.
    logits = torch.log(torch.tensor([[[0.5, 0.25, 0.25], [0.1, 0.6, 0.3], [0.2, 0.2, 0.6]]]))
    labels = torch.tensor([[2, 1, 2]])  # position 0 predicts token 1 (label 1), 1 predicts 2
    mask = torch.tensor([[False, True, True]])
    expected = (math.log(0.25) + math.log(0.3)) / 2
    assert sequence_logprobs(logits, labels, mask).item() == pytest.approx(expected)
    only_last = torch.tensor([[False, False, True]])
    assert sequence_logprobs(logits, labels, only_last).item() == pytest.approx(math.log(0.3))
    assert sequence_logprobs(logits, labels).item() == pytest.approx(expected)  # no mask: all
    none = torch.tensor([[True, False, False]])  # nothing selected after the shift: 0, not NaN
    assert sequence_logprobs(logits, labels, none).item() == 0.0


def test_dpo_loss_equals_the_hand_computed_formula() -> None:
    pc, pr = torch.tensor([-1.0, -2.0]), torch.tensor([-3.0, -1.5])
    rc, rr = torch.tensor([-1.5, -2.5]), torch.tensor([-2.0, -1.0])
    beta = 0.5
    loss, chosen_reward, rejected_reward = compute_dpo_loss(pc, pr, rc, rr, beta=beta)
    # Row 0: (pc-rc) - (pr-rr) = 0.5 - (-1.0) = 1.5; row 1: 0.5 - (-0.5) = 1.0.
    expected = (-math.log(1 / (1 + math.exp(-0.75))) - math.log(1 / (1 + math.exp(-0.5)))) / 2
    assert loss.item() == pytest.approx(expected)
    assert chosen_reward.item() == pytest.approx(0.5 * (0.5 + 0.5) / 2)
    assert rejected_reward.item() == pytest.approx(0.5 * (-1.0 - 0.5) / 2)
    # Policy equal to the reference: loss log(2), both rewards 0.
    loss, cr, rr_ = compute_dpo_loss(pc, pr, pc, pr)
    assert loss.item() == pytest.approx(math.log(2)) and cr.item() == 0.0 and rr_.item() == 0.0


def test_loss_gradient_reaches_the_policy_only() -> None:
    pc = torch.tensor([-1.0], requires_grad=True)
    pr = torch.tensor([-1.0], requires_grad=True)
    loss, cr, rr = compute_dpo_loss(pc, pr, torch.tensor([-1.0]), torch.tensor([-1.0]))
    loss.backward()
    assert pc.grad is not None and pr.grad is not None
    assert pc.grad.item() < 0 < pr.grad.item()  # raise chosen, lower rejected
    assert not cr.requires_grad and not rr.requires_grad


# --- chapter-faithful mode: the book's bonus notebook (ch07/04_preference-tuning-with-dpo,
# dpo-from-scratch.ipynb in rasbt/LLMs-from-scratch), sections 2.3-2.4 and 4 ---------------

# The shapes its "Train loader:" cell prints for the first 12 training batches (batch 8,
# torch.manual_seed(123) before the loader is first iterated).
BOOK_TRAIN_WIDTHS = [77, 81, 94, 75, 75, 76, 99, 71, 67, 88, 65, 79]


def _book_tokens(entry: Mapping[str, str]) -> dict[str, list[int]]:
    """The book's PreferenceDataset item: format_input, and each full text tokenized whole."""
    prompt = format_input(entry)
    return {
        "prompt": encode(prompt),
        "chosen": encode(f"{prompt}\n\n### Response:\n{entry['chosen']}"),
        "rejected": encode(f"{prompt}\n\n### Response:\n{entry['rejected']}"),
    }


def _book_collate(
    batch: Sequence[Mapping[str, list[int]]],
    allowed_max_length: int | None = None,
    mask_prompt_tokens: bool = True,
) -> dict[str, Any]:
    """The reference: the book's `custom_collate_fn`, restated (not the course's code path).

    Every sequence is padded with <|endoftext|> to the longest chosen/rejected length + 1; a
    position counts (mask True) if it holds a real token and, with mask_prompt_tokens, lies
    past the prompt (format_input) + 2 tokens; the stacked tensors are cut to
    allowed_max_length at the end.
    """
    width = max(len(item[key]) + 1 for item in batch for key in ("chosen", "rejected"))
    out: dict[str, Any] = {"prompt": [torch.tensor(item["prompt"]) for item in batch]}
    for key in ("chosen", "rejected"):
        rows, masks = [], []
        for item in batch:
            ids, skip = item[key], len(item["prompt"]) + 2 if mask_prompt_tokens else 0
            rows.append(ids + [EOS_ID] * (width - len(ids)))
            masks.append([skip <= i < len(ids) for i in range(width)])
        out[key] = torch.tensor(rows)[:, :allowed_max_length]
        out[f"{key}_mask"] = torch.tensor(masks)[:, :allowed_max_length]
    return out


@pytest.mark.filterwarnings("ignore:collate_pairs.*no (chosen|rejected) answer token left")
def test_chapter_collate_is_the_books_on_real_pairs(book_pairs: list[dict[str, str]]) -> None:
    pairs = book_pairs[:48]
    dataset = PreferenceDataset(pairs, chapter_compat=True)
    for index, entry in enumerate(pairs):
        assert dataset[index]._asdict() == _book_tokens(entry)
    cases = [(2, None, True), (8, None, True), (8, 1024, True), (6, 64, True), (8, None, False)]
    for size, allowed, mask_prompt in cases:
        for start in range(0, len(pairs), size):
            items = [dataset[i] for i in range(start, min(start + size, len(pairs)))]
            ours = collate_pairs(
                items, allowed_max_length=allowed, mask_prompt=mask_prompt, chapter_compat=True
            )
            book = _book_collate([i._asdict() for i in items], allowed, mask_prompt)
            assert ours.keys() == book.keys()
            for key in ("chosen", "rejected", "chosen_mask", "rejected_mask"):
                assert torch.equal(ours[key], book[key]), (size, allowed, mask_prompt, key)
            assert all(
                torch.equal(a, b) for a, b in zip(ours["prompt"], book["prompt"], strict=True)
            )


def test_chapter_loaders_give_the_books_printed_batches(book_pairs: list[dict[str, str]]) -> None:
    book = make_preference_loaders(
        split_data(book_pairs), batch_size=8, allowed_max_length=1024, chapter_compat=True
    )
    # Section 2.3's example batch, the first two pairs: 81 wide; 50 masked prompt tokens,
    # then "### Response:" and the answer (24 tokens), then 7 of padding.
    example = collate_pairs([book.train.dataset[i] for i in (0, 1)], chapter_compat=True)
    assert example["chosen"].shape == (2, 81)
    assert example["chosen_mask"][0].tolist() == [False] * 50 + [True] * 24 + [False] * 7
    assert decode(example["chosen"][0][example["chosen_mask"][0]].tolist()) == (
        '### Response:\nThe spelling of the given phrase "freind" is incorrect, the correct '
        'spelling is "friend".'
    )
    torch.manual_seed(123)  # as the book does; its loader shuffles from the global state
    widths = [(b["chosen"].shape, b["rejected"].shape) for b in itertools.islice(book.train, 12)]
    assert widths == [((8, w), (8, w)) for w in BOOK_TRAIN_WIDTHS]
    assert len(book.train) == 935 // 8 and len(book.validation) == 7  # drop_last for train only
    # The course's default: the same tokens, one position narrower, the header masked too.
    course = collate_pairs([tokenize_pair(e) for e in book_pairs[:2]])
    assert course["chosen"].shape == (2, 80)
    assert decode(course["chosen"][0][course["chosen_mask"][0]].tolist()).startswith("The spelling")


def _book_logprobs(logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The book's compute_logprobs, restated: shifted labels, mask[:, 1:], a masked mean."""
    chosen = torch.gather(F.log_softmax(logits[:, :-1], -1), -1, labels[:, 1:, None])[..., 0]
    return (chosen * mask[:, 1:]).sum(-1) / mask[:, 1:].sum(-1)


def test_book_rewards_are_the_log_ratios_and_the_loss_is_the_books() -> None:
    g = torch.Generator().manual_seed(5)
    pc, pr, rc, rr = (-torch.rand(6, generator=g) * 3 for _ in range(4))
    beta = 0.3
    loss, chosen, rejected = compute_dpo_loss(pc, pr, rc, rr, beta, chapter_compat=True)
    # The book's compute_dpo_loss: logits = (pc - pr) - (rc - rr), rewards without beta.
    book_loss = -F.logsigmoid(beta * ((pc - pr) - (rc - rr))).mean()
    torch.testing.assert_close(loss, book_loss)
    torch.testing.assert_close(chosen, (pc - rc).mean())
    torch.testing.assert_close(rejected, (pr - rr).mean())
    course = compute_dpo_loss(pc, pr, rc, rr, beta)  # the course's: beta x the book's rewards
    torch.testing.assert_close(course, (loss, beta * chosen, beta * rejected))
    # Log-probabilities as the book averages them, on a chapter batch's masks.
    batch = collate_pairs(
        [PairExample([1, 2], [1, 2, 3, 4, 5, 6], [1, 2, 3, 4, 7])], chapter_compat=True
    )
    logits = torch.randn(1, batch["chosen"].shape[1], 8, generator=g)
    for key in ("chosen", "rejected"):
        ids, mask = batch[key] % 8, batch[f"{key}_mask"]
        torch.testing.assert_close(
            sequence_logprobs(logits, ids, mask), _book_logprobs(logits, ids, mask)
        )


def test_the_loader_metrics_are_named_after_the_rewards(tiny_config: Any) -> None:
    from helpers.model import GPTModel

    torch.manual_seed(0)
    policy = GPTModel(tiny_config).eval()
    pairs = [
        {"instruction": f"Say {i}.", "input": "", "chosen": "Yes.", "rejected": "No!"}
        for i in range(4)
    ]
    loader = make_preference_loaders((pairs, pairs, pairs), batch_size=2).validation
    book = dpo_loss_loader(loader, policy, policy, chapter_compat=True)
    assert (
        tuple(book)
        == BOOK_REWARDS.metrics
        == ("loss", "chosen_logratio", "rejected_logratio", "logratio_margin")
    )
    assert tuple(dpo_loss_loader(loader, policy, policy)) == (
        "loss",
        "chosen_reward",
        "rejected_reward",
        "reward_margin",
    )
