"""Data-parallel training under torchrun (helpers.run.distributed), on the CPU with gloo.

The pieces first (row slices, loss weights, the evaluation's share of the batches), then real
`torchrun --nproc_per_node=2` runs of the tiny model: the same history as one process, one
set of files, a rank killed with SIGKILL and the run resumed with 2 processes and with 1.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from helpers.batching import IGNORE_INDEX, loader_generators, make_loaders
from helpers.data import split_data
from helpers.run.checkpoints import load_checkpoint
from helpers.run.distributed import (
    DistributedError,
    Ranks,
    _share,
    check_batch_size,
    gather_parts,
    loss_scale,
    rank_rows,
    take_rows,
)
from helpers.train import _first_batches

ROOT = Path(__file__).resolve().parents[2]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
# Measured: the 2-process history differs from the 1-process one by at most 1e-6 (the order
# of float additions differs: the ranks' shares of the batch and of the evaluation).
ATOL = 1e-5
Batch = tuple[torch.Tensor, torch.Tensor]
# One epoch without dropout: each process draws its own dropout masks, so only a run without
# dropout can equal the 1-process one (tiny's default is 0.1).
RUN_FLAGS = (
    "--model tiny --limit 60 --batch-size 5 --epochs 1 --drop-rate 0 --eval-freq 2 --eval-iter 3 "
    "--test-limit 3 --max-new-tokens 4 --checkpoint-every 3 --quiet"
).split()


# --- the pieces ------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [2, 5, 8])
@pytest.mark.parametrize("world", [1, 2, 3])
def test_rows_cover_the_batch_once_in_near_equal_shares(n: int, world: int) -> None:
    if n < world:
        return
    parts = [list(range(n))[Ranks(r, world).rows(n)] for r in range(world)]
    assert sum(parts, []) == list(range(n))
    assert max(map(len, parts)) - min(map(len, parts)) <= 1


def test_take_rows_splits_tensors_tuples_dicts_and_lists() -> None:
    x = torch.arange(12).view(4, 3)
    assert torch.equal(take_rows((x, x + 1), slice(1, 3))[1], (x + 1)[1:3])
    pairs = {"chosen": x, "prompt": [torch.tensor([i]) for i in range(4)]}
    part = rank_rows(pairs, Ranks(1, 2))
    assert torch.equal(part["chosen"], x[2:]) and [int(p) for p in part["prompt"]] == [2, 3]
    assert rank_rows(pairs, Ranks()) is pairs  # a single process: the batch as it is
    with pytest.raises(DistributedError, match="cannot be split over 5 processes"):
        rank_rows(pairs, Ranks(0, 5))


def test_weighted_rank_gradients_average_to_the_batch_gradient() -> None:
    """The chapter's loss is a mean over the batch's targets: each rank's mean times
    loss_scale, with gradients averaged as DDP does, gives the whole batch's gradient, also
    when the ranks have different numbers of targets, and one has none (a NaN mean)."""
    torch.manual_seed(0)
    logits = torch.randn(3, 4, 10, dtype=torch.float64, requires_grad=True)  # (B, T, V)
    targets = torch.randint(0, 10, (3, 4))
    targets[0, 1:] = IGNORE_INDEX  # row 0: 1 target, row 1: none, row 2: 4
    targets[1] = IGNORE_INDEX

    def loss(rows: slice) -> torch.Tensor:
        return F.cross_entropy(
            logits[rows].flatten(0, 1), targets[rows].flatten(), ignore_index=IGNORE_INDEX
        )

    (whole,) = torch.autograd.grad(loss(slice(None)), logits)
    total = int((targets != IGNORE_INDEX).sum())
    averaged = torch.zeros_like(logits)
    for rank in (Ranks(r, 3) for r in range(3)):
        mine = int((targets[rank.rows(3)] != IGNORE_INDEX).sum())
        (grad,) = torch.autograd.grad(loss(rank.rows(3)) * loss_scale(mine, total, rank), logits)
        averaged += grad / 3  # DDP: the mean of the ranks' gradients
    assert torch.allclose(averaged, whole)
    assert loss_scale(3, 6, Ranks(0, 2)) == 1.0


@pytest.mark.parametrize("eval_iter", [3, 17, 40])  # fewer batches than the loader, all, more
def test_evaluation_shares_see_one_process_batches_and_draws(
    chapter_data: list[dict[str, str]], eval_iter: int
) -> None:
    """Each rank's share holds its batches of what one process evaluates, and leaves the
    shuffling's random state as one process does (the next evaluation sees the same)."""
    train = make_loaders(split_data(chapter_data[:100]), batch_size=5).train  # 17 batches
    (gen,) = loader_generators(train)

    def evaluated(batches: Callable[[], Iterable[Batch]]) -> tuple[list[int], int]:
        gen.manual_seed(7)  # the same random state before each evaluation
        sums = [int(x.sum()) for x, _ in batches()]
        return sums, int(gen.get_state().sum())

    one, state = evaluated(lambda: _first_batches(train, min(eval_iter, len(train))))
    for rank in range(2):
        share = functools.partial(_share, train, eval_iter, Ranks(rank, 2))
        mine, rank_state = evaluated(share)
        assert mine == one[rank::2] and rank_state == state


def test_batch_size_smaller_than_the_processes_is_refused(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(DistributedError, match="--batch-size 2 is the global batch"):
        check_batch_size(2)
    check_batch_size(4)


def test_generation_parts_merge_into_the_single_process_answers(
    tiny_config: object,
) -> None:
    from helpers.generate import GenerationSettings, generate_responses
    from helpers.model import GPTModel

    torch.manual_seed(0)
    model = GPTModel(tiny_config).eval()  # type: ignore[arg-type]
    entries = [{"instruction": f"Count to {i}.", "input": "", "output": ""} for i in range(5)]
    gen = GenerationSettings(max_new_tokens=3, batch_size=2)
    whole = generate_responses(model, entries, gen, progress=False)
    parts = [generate_responses(model, entries, gen, progress=False, part=(r, 2)) for r in (0, 1)]
    merged = [next((p[i] for p in parts if p[i]), "") for i in range(len(entries))]
    assert merged == whole
    assert gather_parts(lambda part: whole) == whole  # a single process: its own work


# --- torchrun, 2 processes on the CPU -------------------------------------------------------


def _env() -> dict[str, str]:
    # One thread per process: 2 processes share the 2 cores.
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


def _run(cmd: list[str], timeout: float = 240) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=timeout, check=False
    )


def _finetune(procs: int, data: Path, out: Path, *extra: str) -> list[str]:
    flags = [*RUN_FLAGS, "--data", str(data), "--output-dir", str(out), *extra]
    if procs == 1:
        return [sys.executable, "-m", "helpers.finetune", *flags]
    return [*TORCHRUN, f"--nproc_per_node={procs}", "-m", "helpers.finetune", *flags]


def _history(out: Path) -> pd.DataFrame:
    return pd.read_csv(out / "history.csv")


def _files(out: Path) -> list[str]:
    return sorted(str(p.relative_to(out)) for p in out.rglob("*"))


@pytest.fixture(scope="module")
def one_process(chapter_data_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("one") / "run"
    done = _run(_finetune(1, chapter_data_path, out))
    assert done.returncode == 0, done.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def two_processes(
    chapter_data_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, subprocess.CompletedProcess[str]]:
    out = tmp_path_factory.mktemp("two") / "run"
    done = _run(_finetune(2, chapter_data_path, out))
    assert done.returncode == 0, done.stderr[-3000:]
    return out, done


def test_two_processes_train_as_one_with_the_same_global_batch(
    one_process: Path, two_processes: tuple[Path, subprocess.CompletedProcess[str]]
) -> None:
    two, _ = two_processes
    one_history, two_history = _history(one_process), _history(two)
    assert len(one_history) == 5  # 10 steps of 5 rows (split 3 + 2), evaluated every 2
    pd.testing.assert_frame_equal(two_history, one_history, check_exact=False, atol=ATOL, rtol=0)
    assert two_history["val_loss"].iloc[-1] < two_history["val_loss"].iloc[0] - 1.0  # it learned
    # The test answers: split between the ranks, gathered in the entries' order.
    answers = [
        json.loads((d / "summary.json").read_text())["answers"]["n"] for d in (one_process, two)
    ]
    assert answers == [3, 3]


def test_only_rank_0_writes_and_prints(
    one_process: Path, two_processes: tuple[Path, subprocess.CompletedProcess[str]]
) -> None:
    two, done = two_processes
    assert _files(two) == _files(one_process)  # one set of files, no temp files left over
    assert done.stdout.count("=== Fine-tuning summary ===") == 1
    assert done.stdout.count("Initial loss") == 1


def _children(pid: int) -> list[int]:
    return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def _rank_pid(launcher: int, rank: int) -> int:
    for child in _children(launcher):
        environ = Path(f"/proc/{child}/environ").read_bytes().split(b"\0")
        if f"RANK={rank}".encode() in environ:
            return child
    raise AssertionError(f"no process of rank {rank} under {launcher}")


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="finds the ranks in /proc")
def test_a_killed_rank_stops_the_run_and_it_resumes_with_2_or_1_processes(
    chapter_data_path: Path, tmp_path: Path, one_process: Path
) -> None:
    out = tmp_path / "run"
    ckpt = out / "checkpoints" / "checkpoint.pt"
    launcher = subprocess.Popen(
        _finetune(2, chapter_data_path, out),
        cwd=ROOT,
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 180
    while not ckpt.is_file() and launcher.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    assert ckpt.is_file() and launcher.poll() is None, "no checkpoint before the run ended"
    os.kill(_rank_pid(launcher.pid, 1), signal.SIGKILL)
    _, err = launcher.communicate(timeout=120)
    assert launcher.returncode != 0
    stopped = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(stopped) == 1 and "rank 1 of 2 stopped" in stopped[0], err[-3000:]
    step = load_checkpoint(ckpt).state.step  # a valid checkpoint, mid-run
    assert 3 <= step < 10

    again = tmp_path / "again"
    shutil.copytree(out, again)
    for procs, folder in ((2, out), (1, again)):
        done = _run(_finetune(procs, chapter_data_path, folder, "--resume"))
        assert done.returncode == 0, done.stderr[-3000:]
        pd.testing.assert_frame_equal(
            _history(folder), _history(one_process), check_exact=False, atol=ATOL, rtol=0
        )


def test_a_batch_smaller_than_the_processes_is_one_error_line(
    chapter_data_path: Path, tmp_path: Path
) -> None:
    done = _run(_finetune(2, chapter_data_path, tmp_path / "run", "--batch-size", "1"))
    assert done.returncode != 0
    assert "error: --batch-size 1 is the global batch" in done.stderr
    assert str(ROOT / "helpers") not in done.stderr  # no traceback through the course's code


def test_dpo_under_torchrun_matches_one_process(one_process: Path, tmp_path: Path) -> None:
    from helpers.dpo.preferences import save_preferences

    pair = {"input": "", "rejected": "No."}
    pairs = [
        {**pair, "instruction": f"Say {i}.", "output": f"{i}.", "chosen": f"Sure: {i}."}
        for i in range(40)
    ]
    data = save_preferences(pairs, tmp_path / "prefs.json")
    sft = one_process / "tiny-sft.safetensors"
    flags = "--limit 40 --batch-size 4 --eval-freq 2 --eval-iter 3 --response-limit 1".split()
    flags += ["--max-new-tokens", "4", "--quiet", "--sft-checkpoint", str(sft), "--data", str(data)]
    outs = [tmp_path / "dpo1", tmp_path / "dpo2"]
    one = [sys.executable, "-m", "helpers.dpo", *flags, "--output-dir", str(outs[0])]
    two = [
        *TORCHRUN,
        "--nproc_per_node=2",
        "-m",
        "helpers.dpo",
        *flags,
        "--output-dir",
        str(outs[1]),
    ]
    for cmd in (one, two):
        done = _run(cmd)
        assert done.returncode == 0, done.stderr[-3000:]
    pd.testing.assert_frame_equal(
        _history(outs[1]), _history(outs[0]), check_exact=False, atol=ATOL, rtol=0
    )
    assert _files(outs[1]) == _files(outs[0])
