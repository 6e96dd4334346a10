"""DPO: pair collation and masks, log-probabilities and the loss against hand-computed values,
the training loop (margin grows, reference frozen, exact resume) and the command line."""

from __future__ import annotations

import json
import math

import pandas as pd
import pytest
import torch
from torch.utils.data import DataLoader

from helpers.config import GPTConfig
from helpers.dpo import (
    PairExample,
    PreferenceDataset,
    collate_pairs,
    compute_dpo_loss,
    dpo_loss_batch,
    freeze_reference,
    make_preference_loaders,
    sequence_logprobs,
    tokenize_pair,
)
from helpers.dpo_checkpoints import DPOCheckpointError, load_dpo_checkpoint, state_fingerprint
from helpers.dpo_outputs import plot_dpo_history
from helpers.dpo_train import HISTORY_COLUMNS, DPOConfig, train_dpo
from helpers.model import GPTModel
from helpers.prompts import format_prompt
from helpers.tokenizer import encode

PAD = 0


def test_collate_pads_to_one_width_and_masks_prompt_and_padding():
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


def test_collate_warns_when_truncation_leaves_no_answer_and_rejects_bad_items():
    batch = [PairExample(prompt=[1, 2, 3], chosen=[1, 2, 3, 4], rejected=[1, 2, 3, 5])]
    with pytest.warns(UserWarning, match="no (chosen|rejected) answer token left") as caught:
        collate_pairs(batch, allowed_max_length=3)
    assert len(caught) == 2  # chosen and rejected
    with pytest.raises(ValueError, match="empty"):
        collate_pairs([])
    with pytest.raises(ValueError, match="shorter than its prompt"):
        collate_pairs([PairExample([1, 2, 3], [1, 2], [1, 2, 3, 4])])


def test_tokenize_pair_shares_the_inference_prompt():
    entry = {"instruction": "Name a color.", "input": "", "chosen": "Blue.", "rejected": "No."}
    ex = tokenize_pair(entry)
    assert ex.prompt == encode(format_prompt(entry))
    assert ex.chosen == ex.prompt + encode("Blue.") and ex.rejected == ex.prompt + encode("No.")
    assert PreferenceDataset([entry])[0] == ex


def test_sequence_logprobs_by_hand():
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


def test_dpo_loss_equals_the_hand_computed_formula():
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


def test_loss_gradient_reaches_the_policy_only():
    pc = torch.tensor([-1.0], requires_grad=True)
    pr = torch.tensor([-1.0], requires_grad=True)
    loss, cr, rr = compute_dpo_loss(pc, pr, torch.tensor([-1.0]), torch.tensor([-1.0]))
    loss.backward()
    assert pc.grad.item() < 0 < pr.grad.item()  # raise chosen, lower rejected
    assert not cr.requires_grad and not rr.requires_grad


# --- training on small hand-made pairs (vocabulary of 64, so steps take milliseconds) -------

CFG = GPTConfig(vocab_size=64, context_length=32, emb_dim=32, n_heads=2, n_layers=2)


def _pairs(n: int = 24, seed: int = 0) -> list[PairExample]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        prompt = torch.randint(
            1, 64, (int(torch.randint(3, 8, (1,), generator=g)),), generator=g
        ).tolist()
        chosen = [10, 11, 12]  # the preferred answer is always the same: learnable
        rejected = torch.randint(20, 64, (3,), generator=g).tolist()
        out.append(PairExample(prompt, prompt + chosen, prompt + rejected))
    return out


def _loaders(seed: int = 123):
    def loader(data, train):
        return DataLoader(
            data,
            batch_size=4,
            shuffle=train,
            drop_last=train,
            collate_fn=lambda b: collate_pairs(b, pad_token_id=PAD),
            generator=torch.Generator().manual_seed(seed),
        )

    return loader(_pairs(24), True), loader(_pairs(8, seed=1), False)


def _models():
    torch.manual_seed(0)
    policy = GPTModel(CFG)
    return policy, freeze_reference(policy)


def _config(**kw) -> DPOConfig:
    base = dict(lr=3e-3, beta=0.1, eval_freq=2, eval_iter=2, progress=False, log_evals=False)
    return DPOConfig(**(base | kw))


def test_reward_margin_grows_and_the_reference_never_changes():
    policy, reference = _models()
    before = state_fingerprint(reference)
    assert before == state_fingerprint(policy)  # the policy starts as the reference
    train_loader, val_loader = _loaders()
    history = train_dpo(policy, reference, train_loader, val_loader, config=_config(num_epochs=2))
    assert list(history.columns) == HISTORY_COLUMNS
    assert history["step"].tolist() == [0, 2, 4, 6, 8, 10]  # 6 batches x 2 epochs
    assert history["train_reward_margin"].iloc[-1] > history["train_reward_margin"].iloc[0] + 0.05
    assert history["train_loss"].iloc[-1] < history["train_loss"].iloc[0]
    assert history["val_reward_margin"].iloc[-1] > 0
    assert (
        history["train_reward_margin"]
        - (history["train_chosen_reward"] - history["train_rejected_reward"])
    ).abs().max() < 1e-9
    assert state_fingerprint(reference) == before
    assert state_fingerprint(policy) != before
    assert all(not p.requires_grad for p in reference.parameters()) and not reference.training
    # On a batch, the trained policy prefers the chosen answers more than the reference does.
    batch = next(iter(val_loader))
    _, chosen_reward, rejected_reward = dpo_loss_batch(batch, policy, reference)
    assert chosen_reward > rejected_reward


def test_exact_resume_matches_an_uninterrupted_run(tmp_path):
    train_loader, val_loader = _loaders()
    policy, reference = _models()
    full = train_dpo(policy, reference, train_loader, val_loader, config=_config(num_epochs=2))
    full_state = {k: v.clone() for k, v in policy.state_dict().items()}

    for stop in (3, 6, 7):  # mid-epoch, at the epoch boundary, mid second epoch
        ckpt = tmp_path / f"run{stop}"
        policy, reference = _models()
        train_loader, val_loader = _loaders()
        part = train_dpo(policy, reference, train_loader, val_loader,
                         config=_config(num_epochs=2, max_steps=stop, checkpoint_dir=str(ckpt)))  # fmt: skip
        assert part["step"].iloc[-1] <= stop - 1
        assert load_dpo_checkpoint(ckpt)["pos"]["step"] == stop
        # A new process: fresh models and loaders, then resume from the checkpoint.
        policy, reference = _models()
        train_loader, val_loader = _loaders()
        torch.manual_seed(999)  # whatever the random state, the resumed run is the same
        resumed = train_dpo(policy, reference, train_loader, val_loader,
                            config=_config(num_epochs=2, checkpoint_dir=str(ckpt)), resume_from=ckpt)  # fmt: skip
        pd.testing.assert_frame_equal(resumed, full, check_exact=True)
        for key, value in policy.state_dict().items():
            assert torch.equal(value, full_state[key]), key

    # Resuming a finished run trains nothing and keeps its checkpoint intact.
    policy, reference = _models()
    again = train_dpo(policy, reference, train_loader, val_loader,
                      config=_config(num_epochs=2, checkpoint_dir=str(ckpt)), resume_from=ckpt)  # fmt: skip
    pd.testing.assert_frame_equal(again, full, check_exact=True)
    assert again.attrs["steps"] == 12 and load_dpo_checkpoint(ckpt)["pos"]["step"] == 12
    assert all(torch.equal(v, full_state[k]) for k, v in policy.state_dict().items())


def test_resume_refuses_a_different_run(tmp_path):
    train_loader, val_loader = _loaders()
    policy, reference = _models()
    train_dpo(policy, reference, train_loader, val_loader,
              config=_config(max_steps=2, checkpoint_dir=str(tmp_path)))  # fmt: skip
    policy, reference = _models()
    with pytest.raises(DPOCheckpointError, match="beta=0.5 but the checkpoint used 0.1"):
        train_dpo(
            policy,
            reference,
            train_loader,
            val_loader,
            config=_config(beta=0.5),
            resume_from=tmp_path,
        )
    other_reference = freeze_reference(GPTModel(CFG))
    with pytest.raises(DPOCheckpointError, match="reference model differs"):
        train_dpo(
            policy,
            other_reference,
            train_loader,
            val_loader,
            config=_config(),
            resume_from=tmp_path,
        )
    with pytest.raises(DPOCheckpointError, match="no DPO checkpoint"):
        load_dpo_checkpoint(tmp_path / "elsewhere")
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(DPOCheckpointError, match="cannot read"):
        load_dpo_checkpoint(tmp_path / "bad.pt")


def test_plot_and_loaders_from_entries():
    entries = [
        {
            "instruction": f"Count to {i}.",
            "input": "",
            "output": "x",
            "chosen": "Sure: 1 2",
            "rejected": "No.",
        }
        for i in range(20)
    ]
    loaders = make_preference_loaders((entries[:12], entries[12:16], entries[16:]), batch_size=4)
    assert len(loaders.train) == 3 and len(loaders.validation) == 1
    batch = next(iter(loaders.validation))
    assert batch["chosen"].shape == batch["chosen_mask"].shape and batch["chosen"].shape[0] == 4
    history = pd.DataFrame(
        [{c: float(i) for c in HISTORY_COLUMNS} for i in range(3)], columns=HISTORY_COLUMNS
    )
    fig = plot_dpo_history(history, title="t")
    assert [ax.get_ylabel() for ax in fig.axes] == ["DPO loss", "Reward margin"]


# --- the command line -----------------------------------------------------------------------


@pytest.fixture()
def tiny_sft(tmp_path, tiny_config):
    from helpers.weights import save_model

    torch.manual_seed(0)
    return save_model(
        GPTModel(tiny_config), tmp_path / "sft.safetensors", metadata={"base_model": "tiny"}
    )


@pytest.fixture()
def small_prefs(tmp_path):
    from helpers.preferences import save_preferences

    entries = [
        {
            "instruction": f"Say {i}.",
            "input": "",
            "output": f"{i}.",
            "chosen": f"Sure: {i}.",
            "rejected": "No.",
        }
        for i in range(20)
    ]
    return save_preferences(entries, tmp_path / "prefs.json")


def _cli_args(sft, data, out, *extra: str) -> list[str]:
    return [
        "--model", "tiny", "--sft-checkpoint", str(sft), "--data", str(data), "--output-dir", str(out),
        "--batch-size", "4", "--eval-freq", "2", "--eval-iter", "1", "--max-new-tokens", "4", "--response-limit", "1", "--quiet", *extra,
    ]  # fmt: skip


def test_cli_writes_artifacts_and_resumes(tiny_sft, small_prefs, tmp_path, capsys):
    from helpers.dpo_cli import main
    from helpers.weights import load_model

    out = tmp_path / "dpo"
    assert main(_cli_args(tiny_sft, small_prefs, out, "--max-steps", "2")) == 0
    printed = capsys.readouterr().out
    assert "TINY OFFLINE MODE" in printed and "=== DPO summary ===" in printed
    names = {p.name for p in out.iterdir()}
    assert {"history.csv", "dpo-plot.png", "dpo-plot.pdf", "summary.json", "checkpoints", "tiny-dpo.safetensors",
            "validation-responses.json"} <= names  # fmt: skip
    assert not [n for n in names if n.endswith(".tmp")]
    first = pd.read_csv(out / "history.csv")
    assert first["step"].tolist() == [0]
    assert main(_cli_args(tiny_sft, small_prefs, out, "--resume")) == 0
    history = pd.read_csv(out / "history.csv")
    # 20 entries -> 17 train pairs -> 4 batches of 4: steps 0..3, evaluated at 0 and 2
    assert history["step"].tolist() == [0, 2]
    pd.testing.assert_frame_equal(history.iloc[:1], first)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 4 and summary["entries"] == {"train": 17, "validation": 1}
    responses = json.loads((out / "validation-responses.json").read_text())
    assert responses["metadata"]["model"] == "tiny" and len(responses["entries"]) == 1
    assert {"sft_response", "dpo_response"} <= set(responses["entries"][0])
    assert load_model(out / "tiny-dpo.safetensors").cfg.emb_dim == 32


def test_cli_expected_errors_are_one_line_with_exit_code_2(tiny_sft, small_prefs, tmp_path, capsys):
    from helpers.dpo_cli import main

    def err(args) -> str:
        assert main(args) == 2
        text = capsys.readouterr().err.strip()
        assert text.startswith("error: ") and "\n" not in text and "Traceback" not in text
        return text

    assert "no instruction-tuned model at" in err(
        _cli_args(tmp_path / "none.safetensors", small_prefs, tmp_path / "a")
    )
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"instruction": "a", "input": "", "output": "b", "chosen": "c"}]))
    assert "entry 0 is missing the field 'rejected'" in err(
        _cli_args(tiny_sft, bad, tmp_path / "b")
    )
    assert "no such preference file" in err(
        _cli_args(tiny_sft, tmp_path / "nope.json", tmp_path / "c")
    )
    assert "--resume: no DPO checkpoint" in err(
        _cli_args(tiny_sft, small_prefs, tmp_path / "d", "--resume")
    )
    assert "was fine-tuned from tiny" in err(
        [*_cli_args(tiny_sft, small_prefs, tmp_path / "e"), "--model", "gpt2-small"]
    )
    with pytest.raises(SystemExit) as exc:
        main(["--beta", "-1"])
    assert exc.value.code == 2
