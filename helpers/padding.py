"""Padding: a length-grouped batch sampler that avoids it, and `padding_share` that measures it.

`helpers.batching.make_loaders(grouped=True)` batches with `LengthGroupedBatchSampler`;
`padding_share` counts the padded share of a loader's input positions over one epoch without
building tensors or disturbing the batch order training will see (`loader_generators`).
All three are importable from `helpers.batching` too.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence, Sized

import torch
from torch.utils.data import DataLoader, Sampler

__all__ = ["LengthGroupedBatchSampler", "loader_generators", "padding_share"]


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


def loader_generators(loader: DataLoader) -> list[torch.Generator]:
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


def padding_share(loader: DataLoader) -> float:
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
