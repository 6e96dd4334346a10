"""Training throughput: the course's GPTModel vs transformers' GPT2LMHeadModel, same batches.

Both models get GPT-2 small's architecture with the same random weights (speed does not
depend on the weight values), dropout off as in the chapter, AdamW (lr 5e-5, weight decay
0.1) and the chapter's batches (batch size 8, padded to the longest entry in the batch),
either in the chapter's random order or length-grouped (`make_loaders(grouped=True)`).
Both compute the loss the same way (`calc_loss_batch` on the logits): fp32, and on CUDA
also bf16 autocast (as `TrainConfig(bf16=True)` trains); each ratio compares the two models
on the same device, precision and batches, measured in the same run.

Each (model, batching, precision) runs in its own process so its peak memory is its own; on
CPU that is the process's peak resident memory, on CUDA torch.cuda.max_memory_allocated.

    python benchmarks/bench_training.py --quick        # 2 timed steps each (a few minutes on 2 cores)
    python benchmarks/bench_training.py --steps 10
    python benchmarks/bench_training.py --device cuda --full-chapter   # the chapter's 2-epoch run time
    python benchmarks/bench_training.py --device cuda --full-chapter --eval-batched
    python benchmarks/bench_training.py --quick --eval-batched   # also time one evaluation both ways

`--nproc 1,2` times data-parallel training (helpers.run.distributed, as
`torchrun -m helpers.finetune` trains): for each process count it starts `torchrun
--nproc_per_node=N` and prints the global batch's tokens/s and the speed-up over 1 process.
On the CPU the cores are shared out (OMP_NUM_THREADS = cores / N), so it measures how well
N processes use the same cores; on GPUs (`--device cuda`, one GPU per process) the scaling.

    python benchmarks/bench_training.py --nproc 1,2 --steps 4           # CPU, gloo
    python benchmarks/bench_training.py --nproc 1,2,4,8 --device cuda   # one node's GPUs, nccl

`--full-chapter` times the chapter's whole fine-tuning run (gpt2-medium, 2 epochs, batch 8,
evaluation every 5 steps) with random weights, to compare with the book's 0.86 minutes on
an A100; it prints the total time split into training and evaluation (every `eval_freq`
steps: `eval_iter` train and validation batches). `--eval-batched` runs the evaluation with
`RunOptions(eval_batched=True)`: each split's batches in one forward pass, same losses.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import torch

from helpers.batching import loader_generators, make_loaders
from helpers.config import get_config
from helpers.data import load_instruction_data, split_data
from helpers.model import GPTModel
from helpers.run.train_extensions import autocast
from helpers.train import calc_loss_batch, evaluate_model
from helpers.weights import to_hf_state_dict

CHAPTER_A100_MINUTES = 0.86  # the book's gpt2-medium run (2 epochs) on an A100


def chapter_batches(
    grouped: bool, n: int, seed: int = 123
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The first `n` training batches of the chapter's loader (random order or grouped)."""
    loaders = make_loaders(
        split_data(load_instruction_data()), batch_size=8, grouped=grouped, seed=seed
    )
    out = []
    for batch in loaders.train:
        out.append(batch)
        if len(out) == n:
            break
    return out


def build(kind: str, preset: str) -> torch.nn.Module:
    """GPTModel or transformers' GPT2LMHeadModel with identical (seeded random) weights."""
    torch.manual_seed(0)
    model = GPTModel(get_config(preset))
    if kind == "course":
        return model
    import transformers

    transformers.logging.set_verbosity_error()
    cfg = model.cfg
    hf_cfg = transformers.GPT2Config(
        vocab_size=cfg.vocab_size, n_positions=cfg.context_length, n_embd=cfg.emb_dim,
        n_layer=cfg.n_layers, n_head=cfg.n_heads, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    )  # fmt: skip
    hf = transformers.GPT2LMHeadModel(hf_cfg)
    hf.load_state_dict(to_hf_state_dict(model), strict=False)

    class Logits(torch.nn.Module):
        # calc_loss_batch expects model(inputs) -> logits, as the chapter's GPTModel returns.
        def __init__(self, inner: torch.nn.Module) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            return self.inner(input_ids=ids).logits

    return Logits(hf)


def worker(kind: str, grouped: bool, steps: int, device: str, preset: str, bf16: bool) -> dict:
    """Time `steps` training steps (after one warm-up step); returns the figures."""
    dev = torch.device(device)
    batches = chapter_batches(grouped, steps + 1)
    model = build(kind, preset).to(dev).train()
    # fused AdamW on CUDA, as helpers.train.train uses it
    opt = torch.optim.AdamW(model.parameters(), lr=5e-5, weight_decay=0.1, fused=dev.type == "cuda")
    losses, times, tokens, real = [], [], [], []
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for i, (x, y) in enumerate(batches):
        start = time.perf_counter()
        opt.zero_grad()
        with autocast(dev, bf16):  # bf16 autocast on CUDA only, as train() does
            loss = calc_loss_batch(x, y, model, dev)
        loss.backward()
        opt.step()
        if dev.type == "cuda":
            torch.cuda.synchronize()
        losses.append(loss.detach())  # read after the loop: no extra host sync inside it
        if i > 0:  # the first step warms up allocators and kernels
            times.append(time.perf_counter() - start)
            tokens.append(x.numel())
            real.append(int((y != -100).sum()))  # target positions that count in the loss
    if dev.type == "cuda":
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    # Medians of per-step figures: robust to a step slowed down by other work on the machine.
    return {
        "s_per_step": statistics.median(times),
        "tokens_per_s": statistics.median(n / t for n, t in zip(tokens, times, strict=True)),
        "real_tokens_per_s": statistics.median(n / t for n, t in zip(real, times, strict=True)),
        "peak_mib": peak / 2**20,
        "first_loss": losses[0].item(),
        "avg_len": sum(tokens) / len(tokens) / batches[0][0].shape[0],
    }


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def full_chapter(device: str, preset: str, bf16: bool, eval_batched: bool) -> None:
    """Time the chapter's complete fine-tuning run (random weights) and compare with the book."""
    import helpers.train as train_module
    from helpers.run.train_config import RunOptions, TrainConfig
    from helpers.train import train

    dev = torch.device(device)
    loaders = make_loaders(split_data(load_instruction_data()), batch_size=8, device=dev)
    torch.manual_seed(123)
    model = GPTModel(get_config(preset)).to(dev)
    if dev.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # what an A100 uses for fp32 matmuls
        torch.cuda.reset_peak_memory_stats(dev)
    eval_seconds: list[float] = []

    def timed_evaluation(*args, **kwargs):  # train() looks evaluate_model up at each call
        _sync(dev)  # the training steps queued so far count as training time
        start = time.perf_counter()
        result = evaluate_model(*args, **kwargs)
        _sync(dev)
        eval_seconds.append(time.perf_counter() - start)
        return result

    train_module.evaluate_model = timed_evaluation  # type: ignore[assignment]
    _sync(dev)
    start = time.perf_counter()
    try:
        history = train(
            model,
            loaders.train,
            loaders.validation,
            config=TrainConfig(bf16=bf16),
            options=RunOptions(progress=False, log_evals=False, eval_batched=eval_batched),
        )
        _sync(dev)
    finally:
        train_module.evaluate_model = evaluate_model
    total = time.perf_counter() - start
    evaluation = sum(eval_seconds)
    minutes = total / 60
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "CPU"
    precision = "bf16 autocast" if bf16 and dev.type == "cuda" else "fp32/tf32"
    how = "batched (one pass per split)" if eval_batched else "per batch (the chapter's)"
    print(f"Full chapter run: {preset}, 2 epochs, {len(loaders.train)} steps/epoch, "
          f"{precision}, {name}; evaluation {how}")  # fmt: skip
    print(f"  total {total:.1f} s = {minutes:.2f} min  (book: {CHAPTER_A100_MINUTES} min on an "
          f"A100; ratio {CHAPTER_A100_MINUTES / minutes:.2f}x)")  # fmt: skip
    print(f"  training {total - evaluation:.1f} s, evaluation {evaluation:.1f} s "
          f"({len(eval_seconds)} evaluations, {evaluation / max(len(eval_seconds), 1):.3f} s each, "
          f"{evaluation / total:.0%} of the run)")  # fmt: skip
    print(f"  final train/val loss {history['train_loss'].iloc[-1]:.3f} / "
          f"{history['val_loss'].iloc[-1]:.3f} (random init)")  # fmt: skip
    if dev.type == "cuda":
        print(f"  peak GPU memory {torch.cuda.max_memory_allocated(dev) / 2**30:.2f} GiB")


def eval_timing(device: str, preset: str, repeats: int, bf16: bool) -> None:
    """One chapter evaluation (5 train + 5 validation batches of 8) per batch vs batched."""
    dev = torch.device(device)
    loaders = make_loaders(split_data(load_instruction_data()), batch_size=8, device=dev)
    model = build("course", preset).to(dev)
    times: dict[bool, list[float]] = {False: [], True: []}
    losses: dict[bool, tuple[float, float]] = {}
    for _ in range(repeats + 1):  # the first round warms up
        for batched in (False, True):  # alternated: load changes hit both alike
            for gen in loader_generators(loaders.train):  # the same batches either way
                gen.manual_seed(123)
            _sync(dev)
            start = time.perf_counter()
            with autocast(dev, bf16):
                losses[batched] = evaluate_model(
                    model, loaders.train, loaders.validation, dev, 5, batched=batched
                )
            _sync(dev)
            times[batched].append(time.perf_counter() - start)
    per_batch, batched_s = (statistics.median(times[b][1:]) for b in (False, True))
    diff = max(abs(a - b) for a, b in zip(losses[False], losses[True], strict=True))
    print(f"Evaluation (eval_iter 5, batch 8, train + validation), {preset}, {device}"
          f"{', bf16 autocast' if bf16 and dev.type == 'cuda' else ''}, median of {repeats}:")  # fmt: skip
    print(f"  per batch {per_batch:.3f} s, batched {batched_s:.3f} s: "
          f"{per_batch / batched_s:.2f}x; largest loss difference {diff:.1e}")  # fmt: skip


def throughput(args: argparse.Namespace, steps: int) -> None:
    """Every (model, batching, precision) in a child process; figures and same-run ratios."""
    precisions = ("fp32", "bf16") if torch.device(args.device).type == "cuda" else ("fp32",)
    memory = "peak allocated" if torch.device(args.device).type == "cuda" else "peak RSS"
    print(f"Training throughput: {args.model} config, {' and '.join(precisions)}, batch 8, "
          f"{steps} timed steps, device {args.device}, {torch.get_num_threads()} threads")  # fmt: skip
    results = {}
    for precision in precisions:
        for batching in ("random", "grouped"):
            for kind in ("course", "transformers"):
                cmd = [sys.executable, __file__, "--worker", kind, batching, "--steps", str(steps),
                       "--device", args.device, "--model", args.model]  # fmt: skip
                cmd += ["--bf16"] if precision == "bf16" else []
                done = subprocess.run(cmd, capture_output=True, text=True, check=False)
                if done.returncode:
                    print(done.stderr[-2000:])
                    raise SystemExit(f"worker {kind}/{batching}/{precision} failed")
                results[kind, batching, precision] = r = json.loads(
                    done.stdout.strip().splitlines()[-1]
                )
                print(f"  {precision} {kind:13s} {batching:8s} {r['tokens_per_s']:8.0f} tokens/s "
                      f"({r['real_tokens_per_s']:6.0f} non-pad)  "
                      f"{r['s_per_step']:6.3f} s/step  {memory} {r['peak_mib']:7.0f} MiB  "
                      f"(avg padded length {r['avg_len']:.0f}, first loss {r['first_loss']:.4f})")  # fmt: skip
    for precision in precisions:
        for batching in ("random", "grouped"):
            course, hf = results["course", batching, precision], results["transformers", batching, precision]  # fmt: skip
            print(f"GPTModel / transformers, {precision}, {batching} batches: "
                  f"{course['tokens_per_s'] / hf['tokens_per_s']:.2f}x tokens/s (target >= 1.2x), "
                  f"peak memory {course['peak_mib'] / hf['peak_mib']:.2f}x")  # fmt: skip
    for precision in precisions:
        for kind in ("course", "transformers"):
            grouped, random = results[kind, "grouped", precision], results[kind, "random", precision]  # fmt: skip
            ratio = grouped["tokens_per_s"] / random["tokens_per_s"]
            step = random["s_per_step"] / grouped["s_per_step"]
            print(f"{kind}, {precision}: grouped vs random batches: {ratio:.2f}x tokens/s, "
                  f"{step:.2f}x faster steps")  # fmt: skip
    if "bf16" in precisions:
        for kind in ("course", "transformers"):
            for batching in ("random", "grouped"):
                fp32, bf16 = results[kind, batching, "fp32"], results[kind, batching, "bf16"]
                print(f"{kind}, {batching}: bf16 vs fp32 "
                      f"{bf16['tokens_per_s'] / fp32['tokens_per_s']:.2f}x tokens/s, "
                      f"peak memory {bf16['peak_mib']:.0f} vs {fp32['peak_mib']:.0f} MiB")  # fmt: skip


def ddp_worker(steps: int, device: str, preset: str) -> None:
    """One rank of `--nproc`: time `steps` data-parallel steps of the global batch 8 (rank 0 prints)."""
    from helpers.run.distributed import (
        data_parallel,
        local_device,
        loss_scale,
        process_group,
        rank_rows,
    )

    with process_group(device) as ranks:
        dev = local_device(torch.device(device))
        batches = chapter_batches(False, steps + 1)
        model = build("course", preset).to(dev).train()
        trainer = data_parallel(model, dev)
        opt = torch.optim.AdamW(
            model.parameters(), lr=5e-5, weight_decay=0.1, fused=dev.type == "cuda"
        )
        times, tokens = [], []
        for i, (x, y) in enumerate(batches):
            _sync(dev)
            start = time.perf_counter()
            opt.zero_grad()
            xs, ys = rank_rows((x, y), ranks)  # this rank's rows of the global batch
            share = loss_scale(int((ys != -100).sum()), int((y != -100).sum()), ranks)
            (calc_loss_batch(xs, ys, trainer, dev) * share).backward()  # DDP all-reduces
            opt.step()
            _sync(dev)
            if i > 0:  # the first step warms up (and DDP builds its buckets)
                times.append(time.perf_counter() - start)
                tokens.append(x.numel())  # the global batch's tokens: what the run trains on
        if ranks.main:
            rates = [n / t for n, t in zip(tokens, times, strict=True)]
            figures = {
                "s_per_step": statistics.median(times),
                "tokens_per_s": statistics.median(rates),
            }
            print(json.dumps({**figures, "threads": torch.get_num_threads()}))


def nproc_scaling(args: argparse.Namespace, steps: int) -> None:
    """Tokens/s of data-parallel training with each process count in `--nproc`."""
    counts = [int(n) for n in args.nproc.split(",")]
    cores = os.cpu_count() or 1
    if args.device == "cuda":
        where = "CUDA, one GPU per process (nccl)"
    else:
        where = f"CPU (gloo), {cores} cores shared out between the processes"
    print(f"Data-parallel training: {args.model} config, batch 8, {steps} timed steps, {where}")
    base = None
    for n in counts:
        env = {**os.environ, "OMP_NUM_THREADS": str(max(1, cores // n))}
        launch = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
        worker = [__file__, "--ddp-worker", "--steps", str(steps), "--model", args.model]
        cmd = [*launch, f"--nproc_per_node={n}", *worker, "--device", args.device]
        done = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env)
        if done.returncode:
            print(done.stderr[-2000:])
            raise SystemExit(f"torchrun with {n} processes failed")
        r = json.loads(done.stdout.strip().splitlines()[-1])
        base = base or r["tokens_per_s"]
        print(
            f"  {n} process{'es' if n > 1 else '  '} ({r['threads']} threads each): "
            f"{r['tokens_per_s']:8.0f} tokens/s  {r['s_per_step']:6.3f} s/step  "
            f"{r['tokens_per_s'] / base:.2f}x the first"
        )


def main() -> None:
    """Throughput of every configuration, or the chapter's full run, or evaluation timing."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=5, help="timed steps per configuration")
    p.add_argument("--quick", action="store_true", help="2 timed steps per configuration")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--model", default="gpt2-small (124M)", help="config preset (random weights)")
    p.add_argument("--full-chapter", action="store_true", help="time the chapter's 2-epoch run")
    p.add_argument("--model-full", default="gpt2-medium (355M)", help="preset for --full-chapter")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast for --full-chapter (CUDA)")
    p.add_argument(
        "--eval-batched",
        action="store_true",
        help="--full-chapter: evaluate with RunOptions(eval_batched=True); otherwise also time "
        "one evaluation per batch vs batched (course model)",
    )
    p.add_argument("--eval-only", action="store_true", help="only the evaluation timing")
    p.add_argument(
        "--nproc",
        metavar="N[,N...]",
        help="data-parallel tokens/s with each number of processes (torchrun), e.g. 1,2",
    )
    p.add_argument("--ddp-worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--worker", nargs=2, metavar=("KIND", "BATCHING"), help=argparse.SUPPRESS)
    args = p.parse_args()
    steps = 2 if args.quick else args.steps
    if args.ddp_worker:
        ddp_worker(steps, args.device, args.model)
        return
    if args.nproc:
        nproc_scaling(args, steps)
        return
    if args.worker:
        kind, batching = args.worker
        figures = worker(kind, batching == "grouped", steps, args.device, args.model, args.bf16)
        print(json.dumps(figures))
        return
    if args.full_chapter:
        full_chapter(args.device, args.model_full, args.bf16, args.eval_batched)
        return
    if not args.eval_only:
        throughput(args, steps)
    if args.eval_batched or args.eval_only:
        eval_timing(args.device, args.model, steps, args.bf16)


if __name__ == "__main__":
    main()
