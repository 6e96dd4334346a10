"""Tests for helpers.batching: exact collate tensors, the chapter's behaviour, loaders."""

from __future__ import annotations

import random
import warnings
from typing import Any

import pytest
import torch

from helpers.batching import (
    InstructionDataset,
    LengthGroupedBatchSampler,
    Loaders,
    TokenizedExample,
    collate_fn,
    make_loaders,
    padding_share,
    tokenize_example,
)
from helpers.data import DataSplits, split_data
from helpers.prompts import PromptStyle, format_example, format_prompt
from helpers.tokenizer import encode

E = 50256  # <|endoftext|>, the pad token
X = -100  # ignore_index


def chapter_collate_fn(
    batch: list[list[int]],
    pad_token_id: int = 50256,
    ignore_index: int = -100,
    allowed_max_length: int | None = None,
    device: str = "cpu",
) -> tuple[torch.Tensor, torch.Tensor]:
    """The chapter's custom_collate_fn, verbatim in behaviour: the reference to match."""
    batch_max_length = max(len(item) + 1 for item in batch)
    inputs_lst, targets_lst = [], []
    for item in batch:
        new_item = item.copy()
        new_item += [pad_token_id]
        padded = new_item + [pad_token_id] * (batch_max_length - len(new_item))
        inputs = torch.tensor(padded[:-1])
        targets = torch.tensor(padded[1:])
        mask = targets == pad_token_id
        indices = torch.nonzero(mask).squeeze()
        if indices.numel() > 1:
            targets[indices[1:]] = ignore_index
        if allowed_max_length is not None:
            inputs = inputs[:allowed_max_length]
            targets = targets[:allowed_max_length]
        inputs_lst.append(inputs)
        targets_lst.append(targets)
    return torch.stack(inputs_lst).to(device), torch.stack(targets_lst).to(device)


def t(rows: list[list[int]]) -> torch.Tensor:
    return torch.tensor(rows)


CHAPTER_BATCH = [[0, 1, 2, 3, 4], [5, 6], [7, 8, 9]]


# --- exact tensors, written by hand -------------------------------------------------------


def test_collate_chapter_example_exact() -> None:
    inputs, targets = collate_fn(CHAPTER_BATCH)
    assert torch.equal(inputs, t([[0, 1, 2, 3, 4], [5, 6, E, E, E], [7, 8, 9, E, E]]))
    assert torch.equal(targets, t([[1, 2, 3, 4, E], [6, E, X, X, X], [8, 9, E, X, X]]))
    assert inputs.dtype == targets.dtype == torch.int64


def test_collate_with_prompt_masking_exact() -> None:
    batch = [
        TokenizedExample([0, 1, 2, 3, 4], 2),  # prompt 0 1 | answer 2 3 4
        TokenizedExample([5, 6], 1),  # prompt 5 | answer 6
        TokenizedExample([7, 8, 9], 3),  # all prompt: only the end-of-text counts
    ]
    inputs, targets = collate_fn(batch, mask_prompt=True)
    assert torch.equal(inputs, t([[0, 1, 2, 3, 4], [5, 6, E, E, E], [7, 8, 9, E, E]]))
    # targets[j] is token j+1: the first answer token (index P) sits at position P-1.
    assert torch.equal(targets, t([[X, 2, 3, 4, E], [6, E, X, X, X], [X, X, E, X, X]]))


def test_collate_tokenized_without_masking_equals_chapter() -> None:
    batch = [TokenizedExample(ids, 1) for ids in CHAPTER_BATCH]
    got = collate_fn(batch)
    want = chapter_collate_fn([list(ids) for ids in CHAPTER_BATCH])
    assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))


def test_collate_truncation_exact() -> None:
    inputs, targets = collate_fn(CHAPTER_BATCH, allowed_max_length=3)
    assert torch.equal(inputs, t([[0, 1, 2], [5, 6, E], [7, 8, 9]]))
    assert torch.equal(targets, t([[1, 2, 3], [6, E, X], [8, 9, E]]))


def test_collate_truncation_with_masking_exact() -> None:
    batch = [TokenizedExample([0, 1, 2, 3, 4], 2), TokenizedExample([5, 6], 1)]
    inputs, targets = collate_fn(batch, mask_prompt=True, allowed_max_length=2)
    assert torch.equal(inputs, t([[0, 1], [5, 6]]))
    assert torch.equal(targets, t([[X, 2], [6, E]]))


def test_collate_equal_lengths_exact() -> None:
    inputs, targets = collate_fn([[1, 2], [3, 4]])
    assert torch.equal(inputs, t([[1, 2], [3, 4]]))
    assert torch.equal(targets, t([[2, E], [4, E]]))


def test_collate_pad_id_inside_text() -> None:
    # Plain lists follow the chapter: the in-text 50256 is taken as "the" end-of-text target
    # and the real one after the text is ignored (a quirk kept for identical tensors).
    inputs, targets = collate_fn([[1, E, 2], [3]])
    assert torch.equal(inputs, t([[1, E, 2], [3, E, E]]))
    assert torch.equal(targets, t([[E, 2, X], [E, X, X]]))
    assert torch.equal(targets, chapter_collate_fn([[1, E, 2], [3]])[1])
    # TokenizedExample knows where its text ends: the in-text id and the real end both count.
    inputs, targets = collate_fn([TokenizedExample([1, E, 2], 1), TokenizedExample([3], 1)])
    assert torch.equal(inputs, t([[1, E, 2], [3, E, E]]))
    assert torch.equal(targets, t([[E, 2, E], [E, X, X]]))


def test_collate_custom_pad_and_ignore_index() -> None:
    inputs, targets = collate_fn([[1, 2, 3], [4]], pad_token_id=0, ignore_index=-1)
    assert torch.equal(inputs, t([[1, 2, 3], [4, 0, 0]]))
    assert torch.equal(targets, t([[2, 3, 0], [0, -1, -1]]))


def test_collate_accepts_tensors_and_tuples() -> None:
    got = collate_fn([torch.tensor([0, 1, 2, 3, 4]), (5, 6), [7, 8, 9]])
    want = chapter_collate_fn(CHAPTER_BATCH)
    assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))


# --- identical to the chapter on many random batches ------------------------------------------


@pytest.mark.parametrize("seed", range(5))
def test_collate_matches_chapter_on_random_batches(seed: int) -> None:
    rng = random.Random(seed)
    for _ in range(60):
        pad = rng.choice([50256, 0, 7])
        ignore = rng.choice([-100, -1])
        batch = [
            # Small ids so the pad id also shows up inside texts now and then.
            [rng.choice([pad, *range(12)]) for _ in range(rng.randint(1, 20))]
            for _ in range(rng.randint(1, 8))
        ]
        allowed = rng.choice([None, rng.randint(1, 25)])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            got = collate_fn(batch, pad, ignore, allowed)
        want = chapter_collate_fn([list(b) for b in batch], pad, ignore, allowed)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]), (batch, allowed)


# --- warnings and errors ------------------------------------------------------------------


def test_fully_ignored_sample_warns_with_its_position() -> None:
    batch = [TokenizedExample([1, 2, 3], 1), TokenizedExample(list(range(10)), 8)]
    with pytest.warns(UserWarning, match="sample 1 of the batch has no target"):
        _, targets = collate_fn(batch, mask_prompt=True, allowed_max_length=5)
    assert (targets[1] == X).all() and not (targets[0] == X).all()


def test_no_warning_for_normal_batches() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        collate_fn([TokenizedExample([1, 2, 3], 1)], mask_prompt=True)


@pytest.mark.parametrize(
    ("batch", "kwargs", "error", "match"),
    [
        ([], {}, ValueError, "empty"),
        ([[1, 2]], {"mask_prompt": True}, ValueError, "TokenizedExample"),
        ([[1, 2]], {"allowed_max_length": 0}, ValueError, "allowed_max_length"),
        ([TokenizedExample([1, 2], 3)], {}, ValueError, "item 0 has prompt_length 3"),
        ([[1], "abc"], {}, TypeError, "item 1"),
    ],
)
def test_collate_bad_input(
    batch: Any, kwargs: dict[Any, Any] | dict[str, bool] | dict[str, int], error: Any, match: str
) -> None:
    with pytest.raises(error, match=match):
        collate_fn(batch, **kwargs)


# --- invariants on the chapter's data ---------------------------------------------------------


@pytest.fixture(scope="module")
def splits(chapter_data: list[dict[str, str]]) -> DataSplits:
    return split_data(chapter_data)


@pytest.mark.parametrize("style", ["alpaca", "phi3"])
def test_dataset_prompt_prefix_and_full_text(
    chapter_data: list[dict[str, str]], style: str
) -> None:
    dataset = InstructionDataset(chapter_data, style=style)
    assert len(dataset) == len(chapter_data) == len(dataset.lengths)
    for entry, example, length in zip(chapter_data, dataset.examples, dataset.lengths, strict=True):
        assert example.ids[: example.prompt_length] == encode(format_prompt(entry, style))
        assert example.ids == encode(format_example(entry, style))
        assert length == len(example.ids) > example.prompt_length


def test_dataset_rejects_unknown_style(chapter_data: list[dict[str, str]]) -> None:
    with pytest.raises(ValueError, match="valid styles"):
        InstructionDataset(chapter_data[:2], style="chatml")


@pytest.mark.parametrize("style", ["alpaca", "phi3"])
def test_masking_invariants(chapter_data: list[dict[str, str]], style: str) -> None:
    examples = [tokenize_example(entry, style) for entry in chapter_data[:64]]
    for start in range(0, len(examples), 8):
        batch = examples[start : start + 8]
        _, plain = collate_fn(batch)
        _, masked = collate_fn(batch, mask_prompt=True)
        for row, ex in enumerate(batch):
            p = ex.prompt_length
            # Exactly one end-of-text target per sample, right after the text.
            assert (plain[row] == E).sum() == 1 and plain[row, len(ex.ids) - 1] == E
            # Every prompt position ignored; the first answer token is the first counted one.
            assert (masked[row, : p - 1] == X).all()
            assert masked[row, p - 1] == ex.ids[p]
            assert torch.equal(masked[row, p - 1 :], plain[row, p - 1 :])


def test_loss_with_ignore_index_equals_hand_computed() -> None:
    torch.manual_seed(0)
    vocab = 21  # small vocabulary: ids 0..19, pad 20
    batch = [
        TokenizedExample([3, 1, 4, 1, 5, 9], 2),
        TokenizedExample([2, 6], 1),
        TokenizedExample([5, 3, 5, 8], 3),
    ]
    inputs, targets = collate_fn(batch, pad_token_id=20, mask_prompt=True)
    logits = torch.randn(*inputs.shape, vocab)  # (B, T, V)
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten())
    log_probs = torch.log_softmax(logits, dim=-1)
    total, counted = 0.0, 0
    for b in range(targets.shape[0]):
        for j in range(targets.shape[1]):
            if targets[b, j] != X:
                total -= log_probs[b, j, targets[b, j]].item()
                counted += 1
    assert counted == 4 + 1 + 1 + 1 + 1 + 1  # answers 4,1,5,9 / 6 / 8, plus three end-of-texts
    assert loss.item() == pytest.approx(total / counted, rel=1e-6)


# --- loaders ----------------------------------------------------------------------------------


def test_make_loaders_chapter_defaults(splits: DataSplits) -> None:
    loaders = make_loaders(splits)
    assert isinstance(loaders, Loaders)
    assert [len(loader.dataset) for loader in loaders] == [935, 55, 110]  # type: ignore[arg-type]
    assert [len(loader) for loader in loaders] == [116, 7, 14]  # train drops the last 7
    assert [loader.batch_size for loader in loaders] == [8, 8, 8]
    inputs, targets = next(iter(loaders.validation))
    assert inputs.shape == targets.shape and inputs.shape[0] == 8
    first = collate_fn([loaders.validation.dataset[i] for i in range(8)])
    assert torch.equal(inputs, first[0]) and torch.equal(targets, first[1])


def test_make_loaders_seeded_and_deterministic(splits: DataSplits) -> None:
    def first_batches(**kwargs: Any) -> list[torch.Tensor]:
        loader = make_loaders(splits, **kwargs).train
        return [inputs for inputs, _ in list(loader)[:3]]

    a, b = first_batches(), first_batches()
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    c = first_batches(seed=7)
    assert not all(x.shape == y.shape and torch.equal(x, y) for x, y in zip(a, c, strict=True))
    g1, g2 = first_batches(grouped=True), first_batches(grouped=True)
    assert all(torch.equal(x, y) for x, y in zip(g1, g2, strict=True))


def test_make_loaders_masking_and_style(splits: DataSplits) -> None:
    loaders = make_loaders(splits, mask_prompt=True, style="phi3", batch_size=4)
    inputs, targets = next(iter(loaders.test))
    for row in range(4):
        ex = loaders.test.dataset[row]
        assert (targets[row, : ex.prompt_length - 1] == X).all()
        assert targets[row, ex.prompt_length - 1] == ex.ids[ex.prompt_length]
    assert encode("<|user|>") == inputs[0, : len(encode("<|user|>"))].tolist()


def test_make_loaders_rejects_bad_splits(splits: DataSplits) -> None:
    with pytest.raises(ValueError, match="train, validation, test"):
        make_loaders(splits[:2])


def test_padding_share_random_vs_grouped(splits: DataSplits) -> None:
    random_share = padding_share(make_loaders(splits).train)
    grouped_share = padding_share(make_loaders(splits, grouped=True).train)
    assert 0.15 < random_share < 0.25  # the chapter's random batches: ~20% padding
    assert grouped_share < 0.03


@pytest.mark.parametrize("grouped", [False, True])
def test_padding_share_matches_tensors_and_keeps_order(splits: DataSplits, grouped: bool) -> None:
    loader = make_loaders(splits, grouped=grouped).train
    share = padding_share(loader)  # must not consume the sampler's randomness
    padded = total = 0
    batches = []
    for inputs, targets in loader:
        batches.append(inputs)
        # No masking and no pad inside these texts: ignored targets are exactly the padding.
        padded += int((targets == X).sum())
        total += targets.numel()
    assert share == pytest.approx(padded / total)
    fresh = [inputs for inputs, _ in make_loaders(splits, grouped=grouped).train]
    assert all(torch.equal(a, b) for a, b in zip(batches, fresh, strict=True))


def test_length_grouped_sampler() -> None:
    lengths = [random.Random(1).randint(1, 100) for _ in range(103)]
    sampler = LengthGroupedBatchSampler(lengths, 8, shuffle=True, drop_last=True, seed=5)
    epoch1, epoch2 = list(sampler), list(sampler)
    assert len(epoch1) == len(sampler) == 12
    for epoch in (epoch1, epoch2):
        flat = [i for batch in epoch for i in batch]
        assert len(flat) == len(set(flat)) == 96 and all(len(b) == 8 for b in epoch)
        # Sorted by length before batching: batches do not overlap in length.
        spans = sorted((min(lengths[i] for i in b), max(lengths[i] for i in b)) for b in epoch)
        assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:], strict=False))
    assert epoch1 != epoch2  # a new order each epoch
    again = LengthGroupedBatchSampler(lengths, 8, shuffle=True, drop_last=True, seed=5)
    assert list(again) == epoch1
    keep_all = LengthGroupedBatchSampler(lengths, 8, shuffle=False)
    assert len(list(keep_all)) == len(keep_all) == 13
    assert sorted(i for b in keep_all for i in b) == list(range(103))
    with pytest.raises(ValueError, match="batch_size"):
        LengthGroupedBatchSampler(lengths, 0)


def test_padding_share_of_a_plain_dataset_without_lengths() -> None:
    # A list of id lists (no .lengths): lengths are read from the items themselves.
    class Ids(torch.utils.data.Dataset[list[int]]):
        data = [[1, 2, 3], [4], [5, 6], [7, 8, 9, 10]]

        def __getitem__(self, i: int) -> list[int]:
            return self.data[i]

        def __len__(self) -> int:
            return len(self.data)

    loader = torch.utils.data.DataLoader(Ids(), batch_size=2, collate_fn=collate_fn)
    # Batches [3, 1] and [2, 4] ids: widths 3 and 4, padding 2 + 2 of 14 positions.
    assert padding_share(loader) == pytest.approx(4 / 14)


def test_dataset_and_loaders_accept_a_prompt_style_object(
    chapter_data: list[dict[str, str]], splits: DataSplits
) -> None:
    # An unregistered style: the object itself is kept, never looked up by name.
    custom = PromptStyle(
        name="bracketed",
        render_input=lambda e: f"[Q] {e['instruction']} {e.get('input', '')}".rstrip(),
        response_header="\n[A]:\n",
    )
    dataset = InstructionDataset(chapter_data[:3], style=custom)
    assert dataset.style is custom
    for entry, example in zip(chapter_data[:3], dataset.examples, strict=True):
        assert example.ids == encode(format_example(entry, custom))
        assert example.ids[: example.prompt_length] == encode(format_prompt(entry, custom))
    loaders = make_loaders(splits, style=custom, batch_size=4)
    train = loaders.train.dataset
    assert isinstance(train, InstructionDataset) and train.style is custom
    assert InstructionDataset(chapter_data[:1], style="phi3").style.name == "phi3"
