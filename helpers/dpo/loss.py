"""Direct preference optimisation (DPO): tune the instruction model towards chosen answers.

The book's bonus chapter, step by step: each preference pair becomes `prompt + chosen` and
`prompt + rejected` (`collate_pairs`, masks keep the prompt and padding out), a sequence's
log-probability is the mean log-probability of its answer tokens (`sequence_logprobs`), and
`compute_dpo_loss` pushes the policy's log-ratio of chosen over rejected above the frozen
reference model's. `train_dpo` in helpers.dpo.train trains with it (through the course's
one training loop, helpers.train.train: history, checkpoints, exact resume); the command line is
`python -m helpers.dpo` (see helpers.dpo.cli, which writes its files with helpers.dpo.outputs).

Chapter-faithful mode (`chapter_compat=True`, `--chapter-compat`) computes it as the book's
bonus notebook does: its tokenization and `custom_collate_fn` (pairs padded to the longest
length + 1; the mask drops `format_input` plus 2 tokens, so `### Response:` counts as answer),
its shuffling (torch's global random state) and its rewards, which are the policy-minus-
reference log-probabilities (`BOOK_REWARDS`), where the course's are beta times them
(`COURSE_REWARDS`): the book's printed margins are 1/beta (10) times the course's.
"""

from __future__ import annotations

import copy
import functools
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple, TypeVar

import tiktoken
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from helpers.batching import Loaders
from helpers.prompts import format_input, format_prompt, get_style
from helpers.tokenizer import EOS_ID, encode

ModelT = TypeVar("ModelT", bound=nn.Module)


class PairExample(NamedTuple):
    """Token ids of one preference pair: the prompt, and the prompt followed by each answer."""

    prompt: list[int]
    chosen: list[int]
    rejected: list[int]


def tokenize_pair(
    entry: Mapping[str, str],
    style: str = "alpaca",
    tokenizer: tiktoken.Encoding | None = None,
    *,
    chapter_compat: bool = False,
) -> PairExample:
    """`format_prompt(entry)` then each answer, tokenized apart so the prompt ids are shared.

    `chapter_compat=True`: the book's PreferenceDataset, whose prompt is `format_input(entry)`
    (no `### Response:` header) and whose answers are each full text tokenized whole.
    """
    if chapter_compat:
        text = format_input(entry, style)
        head = get_style(style).response_header  # the book's "\n\n### Response:\n"
        return PairExample(
            encode(text, tokenizer),
            encode(text + head + entry["chosen"], tokenizer),
            encode(text + head + entry["rejected"], tokenizer),
        )
    prompt = encode(format_prompt(entry, style), tokenizer)
    return PairExample(
        prompt,
        prompt + encode(entry["chosen"], tokenizer),
        prompt + encode(entry["rejected"], tokenizer),
    )


class PreferenceDataset(Dataset[PairExample]):
    """The book's PreferenceDataset: every pair pre-tokenized once (`tokenize_pair`)."""

    def __init__(
        self,
        data: Sequence[Mapping[str, str]],
        tokenizer: tiktoken.Encoding | None = None,
        style: str = "alpaca",
        *,
        chapter_compat: bool = False,
    ) -> None:
        self.data = list(data)
        self.style = get_style(style).name
        self.examples = [
            tokenize_pair(entry, self.style, tokenizer, chapter_compat=chapter_compat)
            for entry in self.data
        ]

    def __getitem__(self, index: int) -> PairExample:
        return self.examples[index]

    def __len__(self) -> int:
        return len(self.examples)


def _pad_and_mask(
    ids: Sequence[int], prompt_length: int, width: int, pad_token_id: int, mask_prompt: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    padded = torch.tensor(list(ids) + [pad_token_id] * (width - len(ids)))  # (T,)
    mask = torch.zeros(width, dtype=torch.bool)  # True = an answer token that counts
    mask[: len(ids)] = True
    if mask_prompt:
        mask[:prompt_length] = False
    return padded, mask


# The book's custom_collate_fn masks its prompt (format_input) plus these tokens: the "\n\n"
# before "### Response:", so the header itself counts as answer.
BOOK_EXTRA_MASKED = 2


def collate_pairs(
    batch: Sequence[PairExample],
    pad_token_id: int = EOS_ID,
    allowed_max_length: int | None = None,
    mask_prompt: bool = True,
    device: str | torch.device = "cpu",
    *,
    chapter_compat: bool = False,
) -> dict[str, Any]:
    """The book's DPO collate: chosen and rejected padded to one width, with answer masks.

    Returns `prompt` (list of 1-D tensors), `chosen`/`rejected` (B, T) token ids and
    `chosen_mask`/`rejected_mask` (B, T) booleans: True on answer tokens, False on padding
    and (with `mask_prompt`) on the prompt. `allowed_max_length` cuts sequences on the right.
    The course pads to the longest sequence and masks the whole prompt (header included);
    `chapter_compat=True` is the book's `custom_collate_fn` for the book's tokenization
    (`tokenize_pair(chapter_compat=True)`): width longest + 1, and the mask drops the prompt
    plus BOOK_EXTRA_MASKED tokens, so `### Response:` counts.
    """
    if len(batch) == 0:
        raise ValueError("collate_pairs: the batch is empty")
    extra = 1 if chapter_compat else 0  # the book pads one position more than needed
    masked = BOOK_EXTRA_MASKED if chapter_compat else 0
    width = max(len(seq) + extra for item in batch for seq in (item.chosen, item.rejected))
    out: dict[str, Any] = {key: [] for key in ("prompt", "chosen", "rejected")}
    out.update(chosen_mask=[], rejected_mask=[])
    for position, item in enumerate(batch):
        out["prompt"].append(torch.tensor(item.prompt, device=device))
        for key in ("chosen", "rejected"):
            ids = getattr(item, key)
            if len(item.prompt) > len(ids):
                raise ValueError(
                    f"collate_pairs: item {position}'s {key} is shorter than its prompt"
                )
            prompt_length = len(item.prompt) + masked
            padded, mask = _pad_and_mask(ids, prompt_length, width, pad_token_id, mask_prompt)
            if allowed_max_length is not None:
                padded, mask = padded[:allowed_max_length], mask[:allowed_max_length]
            if not bool(mask[1:].any()):
                warnings.warn(
                    f"collate_pairs: item {position} has no {key} answer token left "
                    f"(allowed_max_length {allowed_max_length}); its log-probability is 0",
                    stacklevel=2,
                )
            out[key].append(padded)
            out[f"{key}_mask"].append(mask)
    for key in ("chosen", "rejected", "chosen_mask", "rejected_mask"):
        out[key] = torch.stack(out[key]).to(device)
    return out


def make_preference_loaders(
    splits: Sequence[Sequence[Mapping[str, str]]],
    *,
    batch_size: int = 8,
    style: str = "alpaca",
    mask_prompt: bool = True,
    allowed_max_length: int | None = 1024,
    device: str | torch.device = "cpu",
    seed: int = 123,
    tokenizer: tiktoken.Encoding | None = None,
    chapter_compat: bool = False,
) -> Loaders:
    """Loaders for (train, validation, test) pairs; train shuffled (seeded) with drop_last.

    `chapter_compat=True`: the book's loaders: its tokenization and collate (see
    `collate_pairs`) and no generator, so like the book's they shuffle from torch's global
    random state (helpers.train seeds it with `seed` before the first epoch, as the book's
    `torch.manual_seed(123)` does); `seed` is not used here then.
    """
    if len(splits) != 3:
        raise ValueError("make_preference_loaders: splits must be (train, validation, test)")
    collate = functools.partial(
        collate_pairs,
        allowed_max_length=allowed_max_length,
        mask_prompt=mask_prompt,
        device=device,
        chapter_compat=chapter_compat,
    )
    loaders = []
    for index, data in enumerate(splits):
        is_train = index == 0
        loader = DataLoader(
            PreferenceDataset(
                data, tokenizer=tokenizer, style=style, chapter_compat=chapter_compat
            ),
            batch_size=batch_size,
            shuffle=is_train,
            drop_last=is_train,
            collate_fn=collate,
            generator=None if chapter_compat else torch.Generator().manual_seed(seed),
        )
        loader.chapter_order = chapter_compat  # helpers.train: seed the global RNG once
        loaders.append(loader)
    return Loaders(*loaders)


# --- log-probabilities and the loss ---------------------------------------------------------


def sequence_logprobs(
    logits: torch.Tensor, labels: torch.Tensor, selection_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Mean log-probability per row (B,) of the tokens `labels` under `logits` (B, T, V).

    Position t predicts token t+1, so labels drop their first token and logits their last;
    only tokens whose `selection_mask` is True count (all, without a mask).
    """
    labels = labels[:, 1:]  # (B, T-1)
    log_probs = F.log_softmax(logits[:, :-1, :], dim=-1)  # (B, T-1, V)
    selected = torch.gather(log_probs, -1, labels.unsqueeze(-1)).squeeze(-1)  # (B, T-1)
    if selection_mask is None:
        return selected.mean(-1)
    mask = selection_mask[:, 1:].to(selected.dtype)
    # A row with no selected token (cut by allowed_max_length) counts as 0, not NaN.
    return (selected * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)


@dataclass(frozen=True)
class RewardNames:
    """What the DPO rewards are and how they are named in printed lines, plots and histories."""

    label: str  # e.g. "reward (beta x log-ratio)"
    margin_label: str  # e.g. "Reward margin (beta x log-ratio)": plots and printed lines
    # What `dpo_loss_loader` returns; the history's columns after "train_" / "val_".
    metrics: tuple[str, str, str, str]

    @property
    def margin(self) -> str:
        """The margin's metric name (chosen minus rejected)."""
        return self.metrics[3]


# The course's rewards: beta * (policy - reference) log-probability, the DPO paper's implicit
# reward. The book's: the log-ratio itself, 1/beta times larger.
COURSE_REWARDS = RewardNames(
    "reward (beta x log-ratio)",
    "Reward margin (beta x log-ratio)",
    ("loss", "chosen_reward", "rejected_reward", "reward_margin"),
)
BOOK_REWARDS = RewardNames(
    "log-ratio reward (the book's)",
    "Log-ratio reward margin (the book's)",
    ("loss", "chosen_logratio", "rejected_logratio", "logratio_margin"),
)


def reward_names(chapter_compat: bool = False) -> RewardNames:
    """BOOK_REWARDS in chapter-faithful mode, else COURSE_REWARDS."""
    return BOOK_REWARDS if chapter_compat else COURSE_REWARDS


def compute_dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    reference_chosen_logps: torch.Tensor,
    reference_rejected_logps: torch.Tensor,
    beta: float = 0.1,
    *,
    chapter_compat: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, chosen reward, rejected reward), each the mean over the batch.

    loss = -log sigmoid(beta * ((pc - rc) - (pr - rr))); the rewards are beta * (policy -
    reference) log-probabilities of the chosen and of the rejected answers (detached).
    `chapter_compat=True`: the book's rewards, (policy - reference) without beta.
    """
    chosen = policy_chosen_logps - reference_chosen_logps
    rejected = policy_rejected_logps - reference_rejected_logps
    losses = -F.logsigmoid(beta * (chosen - rejected))
    scale = 1.0 if chapter_compat else beta
    return losses.mean(), (scale * chosen).detach().mean(), (scale * rejected).detach().mean()


def batch_logprobs(
    model: nn.Module, batch: Mapping[str, Any], device: Any = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(chosen, rejected) sequence log-probabilities (B,) in one forward pass of 2B rows."""
    ids = torch.cat([batch["chosen"], batch["rejected"]]).to(device)  # (2B, T)
    mask = torch.cat([batch["chosen_mask"], batch["rejected_mask"]]).to(device)
    logps = sequence_logprobs(model(ids), ids, mask)  # (2B,)
    n = batch["chosen"].shape[0]
    return logps[:n], logps[n:]


def dpo_loss_batch(
    batch: Mapping[str, Any],
    policy: nn.Module,
    reference: nn.Module,
    beta: float = 0.1,
    device: Any = None,
    *,
    chapter_compat: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The DPO loss and rewards of one collated batch; the reference runs without gradients.

    `chapter_compat=True`: the book's rewards (see `compute_dpo_loss`).
    """
    policy_chosen, policy_rejected = batch_logprobs(policy, batch, device)
    with torch.no_grad():
        ref_chosen, ref_rejected = batch_logprobs(reference, batch, device)
    return compute_dpo_loss(
        policy_chosen,
        policy_rejected,
        ref_chosen,
        ref_rejected,
        beta,
        chapter_compat=chapter_compat,
    )


def dpo_loss_loader(
    loader: DataLoader[Any],
    policy: nn.Module,
    reference: nn.Module,
    beta: float = 0.1,
    device: Any = None,
    num_batches: int | None = None,
    *,
    chapter_compat: bool = False,
) -> dict[str, float]:
    """Mean loss, chosen/rejected rewards and reward margin over the first `num_batches`.

    Keyed by `reward_names(chapter_compat).metrics`: the course's rewards (beta x log-ratio)
    as loss, chosen_reward, rejected_reward, reward_margin; the book's (log-ratio) as loss,
    chosen_logratio, rejected_logratio, logratio_margin.
    """
    keys = reward_names(chapter_compat).metrics
    if len(loader) == 0:
        return dict.fromkeys(keys, float("nan"))
    n = len(loader) if num_batches is None else min(num_batches, len(loader))
    totals = [0.0, 0.0, 0.0]
    with torch.no_grad():
        for i, batch in enumerate(loader):
            if i >= n:
                break
            values = dpo_loss_batch(
                batch, policy, reference, beta, device, chapter_compat=chapter_compat
            )
            totals = [t + v.item() for t, v in zip(totals, values, strict=True)]
    loss, chosen, rejected = (t / n for t in totals)
    return dict(zip(keys, (loss, chosen, rejected, chosen - rejected), strict=True))


def freeze_reference(model: ModelT, *, copy_model: bool = True) -> ModelT:
    """The reference model: a copy (by default) in eval mode with no gradients, never trained."""
    reference = copy.deepcopy(model) if copy_model else model
    reference.eval()
    reference.requires_grad_(False)
    return reference
