"""The DPO training loop (helpers.dpo.train) on small hand-made pairs (vocabulary of 64, so
steps take milliseconds): the margin grows, the reference stays frozen, a resume is exact and
refuses a different run (helpers.dpo.checkpoints); loaders from entries and the plot."""

from __future__ import annotations

import pandas as pd
import pytest
import torch
from torch.utils.data import DataLoader

from helpers.config import GPTConfig
from helpers.dpo.checkpoints import DPOCheckpointError, load_dpo_checkpoint, state_fingerprint
from helpers.dpo.loss import (
    PairExample,
    collate_pairs,
    dpo_loss_batch,
    freeze_reference,
    make_preference_loaders,
)
from helpers.dpo.outputs import plot_dpo_history
from helpers.dpo.train import HISTORY_COLUMNS, DPOConfig, train_dpo
from helpers.model import GPTModel

PAD = 0
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
