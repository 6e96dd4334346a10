"""Data-parallel training under `torchrun` (PyTorch DDP): all the distributed plumbing.

`torchrun --nproc_per_node=N -m helpers.finetune ...` starts N processes (ranks) and sets
WORLD_SIZE, RANK and LOCAL_RANK; `process_group` joins them (gloo on the CPU, nccl on CUDA,
one GPU per rank). The design keeps a distributed run the same computation as one process:

- Every rank builds the same global batch, in the same seeded, resumable order, and trains
  on its slice of the rows (`rank_rows`): `--batch-size` stays the global batch, and the
  run's state (and so a checkpoint) does not depend on the number of processes.
- DDP averages the ranks' gradients; the chapter's loss is a mean over the batch's tokens,
  so each rank's loss is weighted by its share of them (`loss_scale`) and the average is
  the gradient of the whole batch.
- Each evaluation's `eval_iter` batches are split between the ranks and their means
  combined (`split_evaluation`), with the same random draws as one process makes.
- Only rank 0 writes files and prints (`worker_options`, `process_group`); the others wait.
- Signals, NaN checks and settings are agreed between the ranks (`first_signal`,
  `all_finite`, `check_same`); a rank that dies is named by the others (`peer_failure`).

Without torchrun none of this runs: every function leaves a single process as it was.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import signal
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, replace
from typing import Any, cast

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Sampler

from helpers.run.train_config import RunOptions
from helpers.runtime import get_device

# After a collective failed: how long the survivors wait for each other before naming the
# ranks that did not report (they all see the failure within a moment of each other).
LIVENESS_WAIT_S = 3.0
_ALIVE_KEY = "helpers-alive"
# evaluate(model, train_loader, val_loader, device, eval_iter) -> metrics (helpers.train)
Evaluate = Callable[
    [torch.nn.Module, DataLoader[Any], DataLoader[Any], torch.device, int], dict[str, float]
]


class DistributedError(Exception):
    """A distributed run cannot start or go on; the message says why, in one line."""


@dataclass(frozen=True)
class Ranks:
    """This process's place in the run: `rank` of `world_size` (`local_rank` on its node)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def active(self) -> bool:
        """More than one process: a distributed run."""
        return self.world_size > 1

    @property
    def main(self) -> bool:
        """Rank 0: the one that writes files and prints."""
        return self.rank == 0

    def rows(self, n: int) -> slice:
        """This rank's rows of a batch of `n`: contiguous, sizes differing by at most one."""
        return slice(self.rank * n // self.world_size, (self.rank + 1) * n // self.world_size)


@dataclass
class _Session:
    """What `process_group` set up: the rendezvous store and a gloo group for CPU messages."""

    store: dist.Store | None = None
    control: dist.ProcessGroup | None = None  # None: the default group (gloo already)


_session = _Session()


def launched() -> Ranks:
    """The ranks torchrun describes in the environment; a single process without it."""
    env = os.environ
    if "WORLD_SIZE" not in env or "RANK" not in env:
        return Ranks()
    rank = int(env["RANK"])
    return Ranks(rank, int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", rank)))


def current() -> Ranks:
    """The ranks of the joined process group; a single process when there is none."""
    if not (dist.is_available() and dist.is_initialized()):
        return Ranks()
    return Ranks(dist.get_rank(), dist.get_world_size(), launched().local_rank)


def local_device(device: torch.device) -> torch.device:
    """This rank's device: under torchrun with CUDA, the GPU numbered LOCAL_RANK."""
    ranks = launched()
    if not ranks.active or device.type != "cuda":
        return device
    if device.index is not None and device.index != ranks.local_rank:
        raise DistributedError(
            f"--device {device} under torchrun: each process uses the GPU numbered by its "
            "LOCAL_RANK; pass --device cuda (or leave it out)"
        )
    return torch.device("cuda", ranks.local_rank)


def _backend(device: torch.device) -> str:
    if device.type == "cuda":
        return "nccl"
    if device.type == "cpu":
        return "gloo"
    raise DistributedError(
        f"a distributed run trains on CUDA GPUs or on the CPU, not on {device.type}; "
        "pass --device cuda or --device cpu"
    )


def _join(ranks: Ranks, device: torch.device) -> None:
    """init_process_group with our own handle on the store (to name a rank that dies)."""
    env = os.environ
    if "MASTER_ADDR" not in env or "MASTER_PORT" not in env:
        raise DistributedError(
            "WORLD_SIZE is set but MASTER_ADDR/MASTER_PORT are not: start the run with torchrun"
        )
    backend = _backend(device)
    # torchrun's agent hosts the store (and outlives the workers); otherwise rank 0 does.
    agent = env.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    store = dist.TCPStore(
        env["MASTER_ADDR"],
        int(env["MASTER_PORT"]),
        ranks.world_size,
        is_master=ranks.main and not agent,
        timeout=datetime.timedelta(minutes=30),
    )
    if backend == "nccl":
        torch.cuda.set_device(device)
    dist.init_process_group(backend, store=store, rank=ranks.rank, world_size=ranks.world_size)
    # Flags and small objects go over gloo on the CPU: no GPU synchronisation per batch.
    control = dist.new_group(backend="gloo") if backend != "gloo" else None
    _session.store, _session.control = store, control


@contextlib.contextmanager
def process_group(prefer: str | None) -> Iterator[Ranks]:
    """Under torchrun, the block runs in the run's process group; otherwise as it is.

    `prefer` is the --device flag (nccl for CUDA, gloo for the CPU). Ranks other than 0
    print nothing on stdout (errors still reach stderr) and, when the block ends normally,
    wait at a barrier until rank 0 has written its files.
    """
    ranks = launched()
    if not ranks.active or dist.is_initialized():
        yield current()
        return
    _join(ranks, local_device(get_device(prefer)))
    try:
        with contextlib.ExitStack() as stack:
            if not ranks.main:  # one copy of every printed line: rank 0's
                devnull = stack.enter_context(open(os.devnull, "w"))
                stack.enter_context(contextlib.redirect_stdout(devnull))
            yield ranks
        dist.barrier(group=_session.control)
    except RuntimeError as exc:  # another rank died: one line naming it, not a traceback
        with ignoring_signals():
            failure = peer_failure(exc, ranks)
        if failure is None:
            raise
        raise failure from exc
    finally:
        dist.destroy_process_group()
        _session.store, _session.control = None, None


def barrier() -> None:
    """Wait until every rank gets here (nothing in a single process)."""
    if current().active:
        dist.barrier(group=_session.control)


def gather(value: Any) -> list[Any]:
    """`value` of every rank, in rank order (all ranks get the list); [value] alone."""
    ranks = current()
    if not ranks.active:
        return [value]
    everyone: list[Any] = [None] * ranks.world_size
    dist.all_gather_object(everyone, value, group=_session.control)
    return everyone


def check_batch_size(batch_size: int, flag: str = "--batch-size") -> None:
    """Refuse a global batch with fewer rows than processes (DistributedError)."""
    world = launched().world_size
    if batch_size < world:
        raise DistributedError(
            f"{flag} {batch_size} is the global batch, split between the processes: it "
            f"cannot be split over {world}; give {flag} {world} or more, or start fewer processes"
        )


def _flat(values: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested mappings as one level, 'train.num_epochs': the names a mismatch error gives."""
    flat: dict[str, Any] = {}
    for key, value in values.items():
        if isinstance(value, Mapping):
            flat.update(_flat(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def check_same(what: str, values: Mapping[str, Any]) -> None:
    """Refuse to go on (DistributedError, on every rank) when a rank's `values` differ."""
    everyone = gather(_flat(values))
    reference: dict[str, Any] = everyone[0]
    for rank, theirs in enumerate(everyone[1:], start=1):
        keys = sorted(set(reference) | set(theirs))
        differ = [
            f"{k} {theirs.get(k)!r} (rank 0: {reference.get(k)!r})"
            for k in keys
            if theirs.get(k) != reference.get(k)
        ]
        if differ:
            raise DistributedError(
                f"rank {rank} was started with other {what} than rank 0: "
                f"{'; '.join(differ[:3])}; start every process (every node) with the same "
                "flags and data"
            )


def worker_options(options: RunOptions, ranks: Ranks) -> RunOptions:
    """`options` for this rank: as given on rank 0; no files, bars or log lines elsewhere."""
    if ranks.main:
        return options
    return replace(
        options,
        checkpoint_dir=None,
        checkpoint_every=None,
        checkpoint_minutes=None,
        progress=False,
        log_evals=False,
    )


def data_parallel(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """`model` wrapped in DistributedDataParallel in a distributed run; else `model` itself.

    DDP copies rank 0's weights to every rank and averages the gradients in backward.
    """
    if not current().active:
        return model
    ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids)


def gradient_sync(model: torch.nn.Module, sync: bool) -> contextlib.AbstractContextManager[Any]:
    """Gradient accumulation under DDP: all-reduce only on the optimizer step's last batch."""
    if sync or not isinstance(model, DistributedDataParallel):
        return contextlib.nullcontext()
    return model.no_sync()


# --- the global batch, split by rows -------------------------------------------------------


def batch_rows(batch: Any) -> int:
    """Rows of a collated batch: the first dimension of its first tensor."""
    if isinstance(batch, torch.Tensor):
        return int(batch.shape[0])
    parts = batch.values() if isinstance(batch, Mapping) else batch
    for part in parts:
        if isinstance(part, torch.Tensor):
            return int(part.shape[0])
    raise TypeError(f"cannot tell the rows of a {type(batch).__name__} batch")


def take_rows(batch: Any, rows: slice) -> Any:
    """The `rows` of every tensor or list in `batch` (a tensor, tuple, list or dict of them)."""
    if isinstance(batch, (torch.Tensor, list)):
        return batch[rows]
    if isinstance(batch, Mapping):
        return {key: take_rows(value, rows) for key, value in batch.items()}
    if isinstance(batch, tuple):
        return tuple(take_rows(part, rows) for part in batch)
    raise TypeError(f"cannot split a {type(batch).__name__} batch between ranks")


def rank_rows(batch: Any, ranks: Ranks) -> Any:
    """This rank's rows of the global `batch` (all of them in a single process)."""
    if not ranks.active:
        return batch
    n = batch_rows(batch)
    if n < ranks.world_size:
        raise DistributedError(
            f"a batch of {n} rows cannot be split over {ranks.world_size} processes "
            "(the batch size is the global batch); use a larger batch or fewer processes"
        )
    return take_rows(batch, ranks.rows(n))


def loss_scale(mine: float, total: float, ranks: Ranks) -> float:
    """Factor of this rank's mean loss so that DDP's average of gradients is the batch's.

    The batch's loss is a mean over its `total` weight (tokens, or rows); this rank's is a
    mean over `mine` of them. DDP divides the sum of the ranks' gradients by their number,
    so each rank's loss counts `world_size * mine / total`.
    """
    return ranks.world_size * mine / total if total else float("nan")


# --- evaluation, split between the ranks ---------------------------------------------------


class _EvalShare(Sampler[list[int]]):
    """This rank's share (every world_size-th) of a loader's first `n` batches.

    It draws from the loader's random state exactly as the chapter's evaluation loop over
    the whole loader does (`for i, batch in enumerate(loader): if i >= n: break`: n + 1
    fetches), so every rank, and the next evaluation, sees the batches one process sees.
    """

    def __init__(self, batches: Iterable[list[int]], n: int, ranks: Ranks) -> None:
        self.batches, self.n = batches, n
        self.mine = list(range(ranks.rank, n, ranks.world_size))

    def __len__(self) -> int:
        return len(self.mine)

    def __iter__(self) -> Iterator[list[int]]:
        # A generator: nothing is drawn before the first fetch, after the loader's seed draw.
        source = iter(self.batches)
        # The (n+1)-th fetch may end a loader of n batches, which draws once more.
        fetched = [next(source, None) for _ in range(self.n + 1)]
        yield from (cast(list[int], fetched[i]) for i in self.mine)


def _share(loader: DataLoader[Any], eval_iter: int, ranks: Ranks) -> DataLoader[Any]:
    if loader.batch_sampler is None:
        raise TypeError("a distributed evaluation needs a batching DataLoader")
    sampler = _EvalShare(loader.batch_sampler, min(eval_iter, len(loader)), ranks)
    share = DataLoader(
        loader.dataset,
        batch_sampler=sampler,
        collate_fn=loader.collate_fn,
        generator=loader.generator,  # its iterator draws a seed from it, as the loader's does
    )
    if len(share) == 0:  # nothing to evaluate here, but the same random draws as the others
        for _ in share:
            pass
    return share


def _split_of(metric: str) -> str:
    split = metric.split("_", 1)[0]
    if split not in ("train", "val"):
        raise ValueError(
            f"a distributed evaluation combines train_* and val_* metrics, not {metric}"
        )
    return split


def split_evaluation(
    evaluate: Evaluate,
    model: torch.nn.Module,
    loaders: tuple[DataLoader[Any], DataLoader[Any]],
    device: torch.device,
    eval_iter: int,
) -> dict[str, float]:
    """`evaluate` on this rank's share of the batches, combined over the ranks.

    Each metric (train_* or val_*) is a mean over its split's evaluated batches, so the
    ranks' means weighted by their numbers of batches give one process's numbers (up to
    the order of the additions). A single process just calls `evaluate`.
    """
    ranks = current()
    if not ranks.active:
        return evaluate(model, loaders[0], loaders[1], device, eval_iter)
    splits = {"train": loaders[0], "val": loaders[1]}
    shares = {split: _share(loader, eval_iter, ranks) for split, loader in splits.items()}
    metrics = evaluate(model, shares["train"], shares["val"], device, eval_iter)
    names = sorted(metrics)
    mine = [len(shares[_split_of(name)]) for name in names]
    weighted = torch.tensor(
        [metrics[n] * k if k else 0.0 for n, k in zip(names, mine, strict=True)],
        dtype=torch.float64,
    )
    dist.all_reduce(weighted, group=_session.control)
    totals = {split: min(eval_iter, len(loader)) for split, loader in splits.items()}
    return {
        name: float(value) / totals[_split_of(name)]
        for name, value in zip(names, weighted.tolist(), strict=True)
    }


def gather_parts(work: Callable[[tuple[int, int]], list[str]]) -> list[str]:
    """`work((rank, world_size))` on every rank, merged: each position from the rank that did it.

    `work` returns the full-length list with "" where another rank's part lies (e.g.
    helpers.generate.generate_responses with `part`). A single process runs `work((0, 1))`.
    """
    ranks = current()
    mine = work((ranks.rank, ranks.world_size))
    if not ranks.active:
        return mine
    parts = gather(mine)
    return [next((part[i] for part in parts if part[i]), "") for i in range(len(mine))]


# --- agreeing on stops and failures --------------------------------------------------------


def first_signal(name: str | None, ranks: Ranks) -> str | None:
    """The stop signal any rank received (its name), so that every rank stops at this batch."""
    if not ranks.active:
        return name
    number = torch.tensor([int(getattr(signal, name)) if name else 0])
    dist.all_reduce(number, op=dist.ReduceOp.MAX, group=_session.control)
    return name or (signal.Signals(int(number)).name if int(number) else None)


def all_finite(check: Callable[[], None], ranks: Ranks) -> None:
    """Run a NaN check on every rank; if it fails on any, FloatingPointError on all of them."""
    if not ranks.active:
        check()
        return
    try:
        check()
        mine = None
    except FloatingPointError as exc:
        mine = str(exc)
    failed = [(rank, message) for rank, message in enumerate(gather(mine)) if message]
    if failed:
        rank, message = failed[0]
        raise FloatingPointError(message if rank == ranks.rank else f"rank {rank}: {message}")


@contextlib.contextmanager
def ignoring_signals() -> Iterator[None]:
    """SIGINT, SIGTERM and SIGHUP ignored in the block: torchrun's stop while a survivor of a
    dead rank reports and saves (torchrun kills it after its grace period anyway)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    names = [name for name in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, name)]
    previous = {name: signal.signal(getattr(signal, name), signal.SIG_IGN) for name in names}
    try:
        yield
    finally:
        for name, handler in previous.items():
            signal.signal(getattr(signal, name), handler)


def lost_ranks(wait: float = LIVENESS_WAIT_S) -> list[int]:
    """After a collective failed: the ranks that do not report through the store in `wait` s."""
    ranks, store = current(), _session.store
    if store is None:
        return []
    prefix = f"{_ALIVE_KEY}/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}/"
    try:
        store.set(prefix + str(ranks.rank), "1")
        time.sleep(wait)
        return [r for r in range(ranks.world_size) if not store.check([prefix + str(r)])]
    except RuntimeError:  # the store is gone: with rank 0, unless torchrun's agent held it
        return [] if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True" else [0]


def _communication_failed(exc: BaseException) -> bool:
    # NCCL raises DistBackendError; gloo a RuntimeError from its transport ("Connection
    # reset by peer" in .../gloo/transport/tcp/pair.cc).
    return isinstance(exc, dist.DistError) or "gloo" in str(exc)


def peer_failure(exc: BaseException, ranks: Ranks) -> DistributedError | None:
    """The one-line error for `exc` if another rank's death caused it; else None."""
    if not ranks.active or not _communication_failed(exc):
        return None
    lost = lost_ranks()
    who = "rank " + ", ".join(map(str, lost)) if lost else "another rank"
    return DistributedError(
        f"{who} of {ranks.world_size} stopped (killed, crashed or out of memory: see its "
        f"output and torchrun's report); rank {ranks.rank} stops too"
    )
