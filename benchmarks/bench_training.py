"""Training throughput: the course's GPTModel vs transformers' GPT2LMHeadModel, same batches.

Both models get GPT-2 small's architecture with the same random weights (speed does not
depend on the weight values), dropout off as in the chapter, AdamW (lr 5e-5, weight decay
0.1) and the chapter's batches (batch size 8, padded to the longest entry in the batch),
either in the chapter's random order or length-grouped (`make_loaders(grouped=True)`).
Both compute the loss the same way (`calc_loss_batch` on the logits), fp32.

Each (model, batching) pair runs in its own process so its peak memory is its own; on CPU
that is the process's peak resident memory, on CUDA torch's peak allocated memory.

    python benchmarks/bench_training.py --quick        # 2 timed steps each (a few minutes on 2 cores)
    python benchmarks/bench_training.py --steps 10
    python benchmarks/bench_training.py --device cuda --full-chapter   # the chapter's 2-epoch run time

`--full-chapter` times the chapter's whole fine-tuning run (gpt2-medium, 2 epochs, batch 8,
evaluation every 5 steps) with random weights, to compare with the book's 0.86 minutes on
an A100.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

import torch

from helpers.batching import make_loaders
from helpers.config import get_config
from helpers.data import load_instruction_data, split_data
from helpers.model import GPTModel
from helpers.train import calc_loss_batch
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


def worker(kind: str, grouped: bool, steps: int, device: str, preset: str) -> dict:
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


def full_chapter(device: str, preset: str, bf16: bool) -> None:
    """Time the chapter's complete fine-tuning run (random weights) and compare with the book."""
    from helpers.train import RunOptions, TrainConfig, train

    dev = torch.device(device)
    loaders = make_loaders(split_data(load_instruction_data()), batch_size=8, device=dev)
    torch.manual_seed(123)
    model = GPTModel(get_config(preset)).to(dev)
    if dev.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # what an A100 uses for fp32 matmuls
        torch.cuda.synchronize()
    start = time.perf_counter()
    history = train(
        model,
        loaders.train,
        loaders.validation,
        config=TrainConfig(bf16=bf16),
        options=RunOptions(progress=False, log_evals=False),
    )
    if dev.type == "cuda":
        torch.cuda.synchronize()
    minutes = (time.perf_counter() - start) / 60
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "CPU"
    print(
        f"Full chapter run: {preset}, 2 epochs, {len(loaders.train)} steps/epoch, {'bf16' if bf16 else 'fp32/tf32'}, {name}"
    )
    print(
        f"  {minutes:.2f} min  (book: {CHAPTER_A100_MINUTES} min on an A100; ratio {CHAPTER_A100_MINUTES / minutes:.2f}x)"
    )
    print(
        f"  final train/val loss {history['train_loss'].iloc[-1]:.3f} / {history['val_loss'].iloc[-1]:.3f} (random init)"
    )
    if dev.type == "cuda":
        print(f"  peak GPU memory {torch.cuda.max_memory_allocated(dev) / 2**30:.1f} GiB")


def main() -> None:
    """Run every (model, batching) pair in a child process and print the comparison."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=5, help="timed steps per configuration")
    p.add_argument("--quick", action="store_true", help="2 timed steps per configuration")
    p.add_argument("--device", default="cpu")
    p.add_argument("--model", default="gpt2-small (124M)", help="config preset (random weights)")
    p.add_argument("--full-chapter", action="store_true", help="time the chapter's 2-epoch run")
    p.add_argument("--model-full", default="gpt2-medium (355M)", help="preset for --full-chapter")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast for --full-chapter (CUDA)")
    p.add_argument("--worker", nargs=2, metavar=("KIND", "BATCHING"), help=argparse.SUPPRESS)
    args = p.parse_args()
    steps = 2 if args.quick else args.steps
    if args.worker:
        kind, batching = args.worker
        print(json.dumps(worker(kind, batching == "grouped", steps, args.device, args.model)))
        return
    if args.full_chapter:
        full_chapter(args.device, args.model_full, args.bf16)
        return

    print(f"Training throughput: {args.model} config, fp32, batch 8, {steps} timed steps, "
          f"device {args.device}, {torch.get_num_threads()} threads")  # fmt: skip
    results = {}
    for batching in ("random", "grouped"):
        for kind in ("course", "transformers"):
            cmd = [sys.executable, __file__, "--worker", kind, batching, "--steps", str(steps),
                   "--device", args.device, "--model", args.model]  # fmt: skip
            done = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if done.returncode:
                print(done.stderr[-2000:])
                raise SystemExit(f"worker {kind}/{batching} failed")
            results[kind, batching] = r = json.loads(done.stdout.strip().splitlines()[-1])
            print(f"  {kind:13s} {batching:8s} {r['tokens_per_s']:8.0f} tokens/s "
                  f"({r['real_tokens_per_s']:6.0f} non-pad)  "
                  f"{r['s_per_step']:6.2f} s/step  peak {r['peak_mib']:7.0f} MiB  "
                  f"(avg padded length {r['avg_len']:.0f}, first loss {r['first_loss']:.4f})")  # fmt: skip
    for batching in ("random", "grouped"):
        ratio = (
            results["course", batching]["tokens_per_s"]
            / results["transformers", batching]["tokens_per_s"]
        )
        print(
            f"GPTModel / transformers, {batching} batches: {ratio:.2f}x tokens/s (target >= 1.2x)"
        )
    for kind in ("course", "transformers"):
        ratio = results[kind, "grouped"]["tokens_per_s"] / results[kind, "random"]["tokens_per_s"]
        step = results[kind, "random"]["s_per_step"] / results[kind, "grouped"]["s_per_step"]
        print(f"{kind}: grouped vs random batches: {ratio:.2f}x tokens/s, {step:.2f}x faster steps")


if __name__ == "__main__":
    main()
