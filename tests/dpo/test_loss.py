"""DPO (helpers.dpo.loss): pair collation and masks, tokenization, log-probabilities and the loss
against hand-computed values. The training loop is in test_dpo_train.py, the command line in
test_dpo_cli.py."""

from __future__ import annotations

import math

import pytest
import torch

from helpers.dpo.loss import (
    PairExample,
    PreferenceDataset,
    collate_pairs,
    compute_dpo_loss,
    sequence_logprobs,
    tokenize_pair,
)
from helpers.prompts import format_prompt
from helpers.tokenizer import encode

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
