"""Tokenized dataset, the chapter's collate function (plus prompt masking) and data loaders.

Also padding: `LengthGroupedBatchSampler` (batches of similar lengths, little padding) and
`padding_share`, which measures the padded share of a loader (notebook 02).
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence, Sized
from typing import Any, NamedTuple

import tiktoken
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from helpers.data import DataSplits
from helpers.prompts import PromptStyle, format_prompt, get_style
from helpers.tokenizer import EOS_ID, encode

# Targets with this value are skipped by the loss: cross_entropy's default, which the
# course's loss (helpers.train.calc_loss_batch) passes explicitly.
IGNORE_INDEX = -100


class TokenizedExample(NamedTuple):
    """Token ids of one training text and how many of them are the prompt."""

    ids: list[int]
    prompt_length: int


def tokenize_example(
    entry: Mapping[str, str],
    style: str | PromptStyle = "alpaca",
    tokenizer: tiktoken.Encoding | None = None,
) -> TokenizedExample:
    """Token ids of `format_example(entry, style)` with the prompt's length remembered."""
    get_style(style)  # fail early with the list of valid styles
    prompt_ids = encode(format_prompt(entry, style), tokenizer)
    # Tokenize prompt and answer separately and concatenate: BPE merges across the
    # boundary could otherwise make ids[:prompt_length] differ from the inference prompt.
    return TokenizedExample(prompt_ids + encode(entry["output"], tokenizer), len(prompt_ids))


class InstructionDataset(Dataset[TokenizedExample]):
    """The chapter's InstructionDataset: entries pre-tokenized once, prompt lengths kept."""

    def __init__(
        self,
        data: Sequence[Mapping[str, str]],
        tokenizer: tiktoken.Encoding | None = None,
        style: str | PromptStyle = "alpaca",
    ) -> None:
        self.data = list(data)
        # The PromptStyle itself: a custom style need not be registered under its name.
        self.style = get_style(style)
        self.examples = [tokenize_example(entry, self.style, tokenizer) for entry in self.data]
        self.lengths = [len(example.ids) for example in self.examples]

    def __getitem__(self, index: int) -> TokenizedExample:
        return self.examples[index]

    def __len__(self) -> int:
        return len(self.examples)


def _unpack(item: object, position: int) -> tuple[list[int], int | None]:
    # TokenizedExample is itself a tuple, so it must be recognised before plain sequences.
    if isinstance(item, TokenizedExample):
        ids, prompt_length = list(item.ids), int(item.prompt_length)
        if not 0 <= prompt_length <= len(ids):
            raise ValueError(
                f"collate_fn: batch item {position} has prompt_length {prompt_length} "
                f"outside 0..{len(ids)}"
            )
        return ids, prompt_length
    if isinstance(item, torch.Tensor):
        return item.flatten().tolist(), None
    if isinstance(item, Sequence) and not isinstance(item, str):
        return list(item), None
    raise TypeError(
        f"collate_fn: batch item {position} must be a list of token ids or a TokenizedExample, "
        f"got {type(item).__name__}"
    )


def _checked_items(
    batch: Sequence[Sequence[int] | torch.Tensor | TokenizedExample],
    allowed_max_length: int | None,
    mask_prompt: bool,
) -> list[tuple[list[int], int | None]]:
    """collate_fn's checks: the batch's (ids, prompt_length) items, or ValueError."""
    if len(batch) == 0:
        raise ValueError("collate_fn: the batch is empty")
    if allowed_max_length is not None and allowed_max_length < 1:
        raise ValueError(f"collate_fn: allowed_max_length must be >= 1, got {allowed_max_length}")
    items = [_unpack(item, i) for i, item in enumerate(batch)]
    if mask_prompt and any(prompt_length is None for _, prompt_length in items):
        raise ValueError(
            "collate_fn: mask_prompt=True needs TokenizedExample items (they carry the prompt "
            "length); plain lists of ids do not say where the prompt ends"
        )
    return items


def _warn_nothing_to_learn(
    position: int, length: int, prompt_length: int | None, allowed_max_length: int | None
) -> None:
    warnings.warn(
        f"collate_fn: sample {position} of the batch has no target left for the loss "
        f"(length {length}, prompt_length {prompt_length}, "
        f"allowed_max_length {allowed_max_length}); it teaches nothing, and a batch "
        f"made only of such samples gives a NaN loss",
        stacklevel=3,  # the caller of collate_fn
    )


def collate_fn(
    batch: Sequence[Sequence[int] | torch.Tensor | TokenizedExample],
    pad_token_id: int = EOS_ID,
    ignore_index: int = IGNORE_INDEX,
    allowed_max_length: int | None = None,
    device: str | torch.device = "cpu",
    mask_prompt: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The chapter's custom_collate_fn: pad, shift targets, ignore extra padding; mask prompts.

    Plain lists of ids give exactly the chapter's tensors. TokenizedExample items know where
    their text ends, so a pad id inside the text is kept as a target, and with
    `mask_prompt=True` every target that is still part of the prompt becomes `ignore_index`.

    `ignore_index` only marks targets; skipping them is the loss's job. The course's loss
    (`helpers.train.calc_loss_batch`) skips IGNORE_INDEX (-100, `cross_entropy`'s default)
    and nothing else, so keep the default when training with it: another value would be
    counted as a target (a real token id) or rejected by `cross_entropy` (a negative one).
    """
    items = _checked_items(batch, allowed_max_length, mask_prompt)  # (ids, prompt_length)
    # +1 so even the longest item gets one <|endoftext|> target that teaches it to stop.
    batch_max_length = max(len(ids) + 1 for ids, _ in items)

    inputs_lst, targets_lst = [], []
    for position, (ids, prompt_length) in enumerate(items):
        padded = ids + [pad_token_id] * (batch_max_length - len(ids))
        inputs = torch.tensor(padded[:-1])  # (T,)
        targets = torch.tensor(padded[1:])  # (T,) the next token at every position
        if prompt_length is None:
            # The chapter's rule: keep the first pad target (the end-of-text), ignore the rest.
            indices = torch.nonzero(targets == pad_token_id).squeeze()
            if indices.numel() > 1:
                targets[indices[1:]] = ignore_index
        else:
            # Same rule by position: target len(ids)-1 is the end-of-text, later ones padding.
            targets[len(ids) :] = ignore_index
            if mask_prompt:
                # targets[j] is token j+1, so the first answer token sits at prompt_length-1.
                targets[: max(prompt_length - 1, 0)] = ignore_index
        if allowed_max_length is not None:
            inputs = inputs[:allowed_max_length]
            targets = targets[:allowed_max_length]
        if bool((targets == ignore_index).all()):
            _warn_nothing_to_learn(position, len(ids), prompt_length, allowed_max_length)
        inputs_lst.append(inputs)
        targets_lst.append(targets)

    inputs_tensor = torch.stack(inputs_lst).to(device)  # (B, T)
    targets_tensor = torch.stack(targets_lst).to(device)  # (B, T)
    return inputs_tensor, targets_tensor


class Loaders(NamedTuple):
    """Data loaders for the three splits."""

    train: DataLoader[Any]
    validation: DataLoader[Any]
    test: DataLoader[Any]


def make_loaders(
    splits: DataSplits | Sequence[Sequence[Mapping[str, str]]],
    *,
    batch_size: int = 8,
    style: str | PromptStyle = "alpaca",
    mask_prompt: bool = False,
    allowed_max_length: int | None = 1024,
    device: str | torch.device = "cpu",
    grouped: bool = False,
    seed: int = 123,
    num_workers: int = 0,
    tokenizer: tiktoken.Encoding | None = None,
    chapter_compat: bool = False,
) -> Loaders:
    """The chapter's loaders (batch 8; train shuffled + drop_last); optional length grouping.

    With `grouped=True` every split is batched by length: train batches are shuffled
    (seeded), validation/test batches come shortest first; either way far less padding.

    By default each loader shuffles with its own generator seeded with `seed`. With
    `chapter_compat=True` (chapter-faithful mode) the loaders have no generator and `seed`
    is not used: like the chapter's, they shuffle from torch's global random state, so
    `torch.manual_seed(123)` before the first epoch gives the chapter's batches (padded
    train widths 61, 76, 73, 68, 65, 72, ... on its dataset).
    """
    if len(splits) != 3:
        raise ValueError(
            "make_loaders: splits must be (train, validation, test), e.g. split_data()"
        )
    if chapter_compat and grouped:
        raise ValueError(
            "make_loaders: grouped=True batches by length, which the chapter does not; "
            "chapter_compat=True needs grouped=False"
        )
    collate = functools.partial(
        collate_fn,
        device=device,
        allowed_max_length=allowed_max_length,
        mask_prompt=mask_prompt,
    )
    loaders = [
        _split_loader(
            InstructionDataset(data, tokenizer=tokenizer, style=style),
            collate,
            train=index == 0,
            batch_size=batch_size,
            grouped=grouped,
            seed=seed,
            num_workers=num_workers,
            chapter_compat=chapter_compat,
        )
        for index, data in enumerate(splits)
    ]
    return Loaders(*loaders)


def _split_loader(
    dataset: InstructionDataset,
    collate: Callable[..., tuple[torch.Tensor, torch.Tensor]],
    *,
    train: bool,
    batch_size: int,
    grouped: bool,
    seed: int,
    num_workers: int,
    chapter_compat: bool,
) -> DataLoader[Any]:
    """One split's loader: the chapter's (train shuffled + drop_last) or length-grouped."""
    # None: the chapter's DataLoader, which draws from torch's global random state.
    generator = None if chapter_compat else torch.Generator().manual_seed(seed)
    if grouped:
        sampler = LengthGroupedBatchSampler(
            dataset.lengths, batch_size, shuffle=train, drop_last=train, seed=seed
        )
        batching: dict[str, Any] = {"batch_sampler": sampler}
    else:
        batching = {"batch_size": batch_size, "shuffle": train, "drop_last": train}
    loader = DataLoader(
        dataset, collate_fn=collate, num_workers=num_workers, generator=generator, **batching
    )
    # Marks the chapter's order for helpers.train (see train_extensions.epoch_batches).
    loader.chapter_order = chapter_compat
    return loader


# --- padding: length-grouped batches that avoid it, `padding_share` that measures it ---


class LengthGroupedBatchSampler(Sampler[list[int]]):
    """Batches of similar-length examples, in shuffled batch order: little padding, seeded."""

    def __init__(
        self,
        lengths: Sequence[int],
        batch_size: int,
        *,
        shuffle: bool = True,
        drop_last: bool = False,
        seed: int = 123,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.lengths = list(lengths)
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.drop_last = drop_last
        # Its own generator: each epoch differs, the sequence of epochs repeats for a seed.
        self.generator = torch.Generator().manual_seed(seed)

    def __iter__(self) -> Iterator[list[int]]:
        n = len(self.lengths)
        if self.shuffle:
            order = torch.randperm(n, generator=self.generator).tolist()
        else:
            order = list(range(n))
        if self.drop_last and n % self.batch_size:
            # Drop random examples (like a shuffled drop_last), not always the longest.
            order = (
                order[n % self.batch_size :] if self.shuffle else order[: n - n % self.batch_size]
            )
        # Stable sort: equal lengths keep their random order, so batches vary between epochs.
        order.sort(key=lambda i: self.lengths[i])
        batches = [order[i : i + self.batch_size] for i in range(0, len(order), self.batch_size)]
        if self.shuffle:
            batches = [batches[i] for i in torch.randperm(len(batches), generator=self.generator)]
        yield from batches

    def __len__(self) -> int:
        n = len(self.lengths)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)


def _item_length(item: object) -> int:
    """Token count of a dataset item: a TokenizedExample (`.ids`), a tensor or a list of ids."""
    ids = getattr(item, "ids", item)
    if isinstance(ids, torch.Tensor):
        return ids.numel()
    if isinstance(ids, Sized):
        return len(ids)
    raise TypeError(f"padding_share: cannot tell the length of a {type(item).__name__} item")


def loader_generators(loader: DataLoader[Any]) -> list[torch.Generator]:
    """The torch.Generators that drive a loader's shuffling (loader, sampler, batch sampler)."""
    batch_sampler = loader.batch_sampler
    candidates = [
        loader.generator,
        getattr(batch_sampler, "generator", None),
        getattr(getattr(batch_sampler, "sampler", None), "generator", None),
    ]
    unique: list[torch.Generator] = []
    for gen in candidates:
        if gen is not None and all(gen is not g for g in unique):
            unique.append(gen)
    return unique


def padding_share(loader: DataLoader[Any]) -> float:
    """Share of input positions that are padding over one epoch of `loader`'s batches.

    Reads only the batch indices and the dataset's lengths (no tensors are built) and
    restores the samplers' random state (torch's global one too, which loaders without a
    generator shuffle from), so training still sees the same batch order.
    """
    dataset, batch_sampler = loader.dataset, loader.batch_sampler
    if batch_sampler is None:
        raise ValueError("padding_share: the loader does not batch (batch_size=None)")
    lengths: Sequence[int] | None = getattr(dataset, "lengths", None)
    if lengths is None:
        if not isinstance(dataset, Sized):
            raise TypeError("padding_share: the loader's dataset has no len()")
        lengths = [_item_length(dataset[i]) for i in range(len(dataset))]
    keywords = getattr(loader.collate_fn, "keywords", {}) or {}
    allowed = keywords.get("allowed_max_length")
    generators = loader_generators(loader)
    states = [gen.get_state() for gen in generators]
    # fork_rng: a loader without generators (chapter_compat) draws from the global state.
    with torch.random.fork_rng(devices=[]):
        try:
            # Iterating a DataLoader first draws its workers' base seed from its generator
            # (else the global state), then the sampler shuffles: take the same draw so the
            # batches seen are the ones the next epoch of training will get.
            torch.empty((), dtype=torch.int64).random_(generator=loader.generator)
            padded, total = _count_padding(batch_sampler, lengths, allowed)
        finally:
            for gen, state in zip(generators, states, strict=True):
                gen.set_state(state)
    return padded / total if total else 0.0


def _count_padding(
    batch_sampler: Iterable[list[int]], lengths: Sequence[int], allowed: int | None
) -> tuple[int, int]:
    """(padding positions, all input positions) over the batches `batch_sampler` yields."""
    padded = total = 0
    for indices in batch_sampler:
        # collate_fn's input width is the longest item (its +1 slot is cut by the shift).
        width = max(lengths[i] for i in indices)
        if allowed is not None:
            width = min(width, allowed)
        total += width * len(indices)
        padded += sum(width - min(lengths[i], width) for i in indices)
    return padded, total
