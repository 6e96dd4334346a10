"""The whole chapter headless: `python -m helpers.finetune --model gpt2-medium` (or `tiny`).

dataset -> model -> initial losses -> fine-tuning -> loss plot -> test-split responses ->
saved model, all written into one output folder, with a summary at the end.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

from helpers.atomic import atomic_path
from helpers.config import resolve_model_name
from helpers.runtime import (
    DEFAULT_MODEL,
    course_model,
    describe_model,
    finetuned_path,
    get_device,
    run_dir,
)

RESPONSES_NAME = "instruction-data-with-response.json"  # the chapter's file name
# Defaults that depend on the model. GPT-2 sizes: the chapter's. `tiny` (random init, two
# CPU cores): a 200-entry subset so a run takes about a minute, a learning rate a randomly
# initialised model can learn something with, and shorter test responses.
CHAPTER_DEFAULTS = {"limit": None, "lr": 5e-5, "max_new_tokens": 256}
TINY_DEFAULTS = {"limit": 200, "lr": 1e-3, "max_new_tokens": 64}


def _positive(kind: type) -> Any:
    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a {kind.__name__}, got {text!r}") from None
        if not value > 0:
            raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
        return value

    return parse


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    # Show "(default: X)" only for real values; None/False defaults are explained in the text.
    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default in (None, False):
            return action.help or ""
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    """The command-line options (defaults are the chapter's)."""
    p = argparse.ArgumentParser(
        prog="python -m helpers.finetune",
        description="Instruction fine-tune a GPT-2 model on the chapter's dataset and write the "
        "loss plot, test-split responses and the fine-tuned model into --output-dir.",
        formatter_class=_HelpFormatter,
    )
    p.add_argument(
        "--model",
        default=None,
        help=f"preset: gpt2-small, gpt2-medium, gpt2-large, gpt2-xl or tiny (default: "
        f"$COURSE_MODEL, else {DEFAULT_MODEL})",
    )
    p.add_argument(
        "--random-init",
        action="store_true",
        help="random weights instead of OpenAI's (timing runs; tiny is always random)",
    )
    p.add_argument(
        "--data",
        default=None,
        help="dataset JSON/JSONL (default: $COURSE_DATASET or the chapter's download)",
    )
    p.add_argument(
        "--limit",
        type=_positive(int),
        default=None,
        help="use only the first N entries of the dataset (default: all; tiny: 200)",
    )
    p.add_argument("--style", default="alpaca", choices=["alpaca", "phi3"], help="prompt style")
    p.add_argument(
        "--mask-prompt", action="store_true", help="compute the loss on response tokens only"
    )
    p.add_argument("--epochs", type=_positive(int), default=2, help="training epochs")
    p.add_argument(
        "--lr",
        type=_positive(float),
        default=None,
        help="AdamW learning rate (default: the chapter's 5e-5; tiny: 1e-3)",
    )
    p.add_argument("--weight-decay", type=float, default=0.1, help="AdamW weight decay")
    p.add_argument("--batch-size", type=_positive(int), default=8, help="batch size")
    p.add_argument(
        "--max-length",
        type=_positive(int),
        default=1024,
        help="truncate examples to this many tokens",
    )
    p.add_argument("--grouped", action="store_true", help="length-grouped batches (less padding)")
    p.add_argument(
        "--grad-accum", type=_positive(int), default=1, help="micro-batches per optimizer step"
    )
    p.add_argument(
        "--max-grad-norm", type=_positive(float), default=None, help="clip gradients to this norm"
    )
    p.add_argument(
        "--schedule",
        choices=["constant", "cosine"],
        default="constant",
        help="learning-rate schedule",
    )
    p.add_argument("--warmup-steps", type=int, default=0, help="linear warmup steps")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast (CUDA only)")
    p.add_argument("--eval-freq", type=_positive(int), default=5, help="evaluate every N steps")
    p.add_argument("--eval-iter", type=_positive(int), default=5, help="batches per evaluation")
    p.add_argument(
        "--early-stopping",
        type=_positive(int),
        default=None,
        metavar="PATIENCE",
        help="stop after PATIENCE evaluations without a better validation loss; keep the best weights",
    )
    p.add_argument(
        "--checkpoint-every",
        type=_positive(int),
        default=None,
        metavar="STEPS",
        help="also save a training checkpoint every STEPS steps (one is always saved at the end)",
    )
    p.add_argument("--no-checkpoint", action="store_true", help="do not write training checkpoints")
    p.add_argument(
        "--resume", action="store_true", help="continue from the checkpoint in --output-dir"
    )
    p.add_argument("--output-dir", default=None, help="default: runs/<model>-sft in the repository")
    p.add_argument(
        "--max-new-tokens",
        type=_positive(int),
        default=None,
        help="response length for the test split (default: 256; tiny: 64)",
    )
    p.add_argument(
        "--test-limit",
        type=_positive(int),
        default=None,
        help="answer only the first N test entries",
    )
    p.add_argument("--device", default=None, help="cpu, cuda, mps (default: best available)")
    p.add_argument("--seed", type=int, default=123, help="shuffling and initialisation seed")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def run(args: argparse.Namespace) -> dict:
    """Do the chapter's steps with parsed `args`; returns the summary it also writes."""
    from helpers.batching import make_loaders
    from helpers.data import load_instruction_data, split_data
    from helpers.evaluate import generate_test_responses
    from helpers.plots import plot_losses, save_loss_plot
    from helpers.train import TrainConfig, calc_loss_loader, train
    from helpers.weights import build_model, save_model

    start = time.perf_counter()
    name = course_model() if args.model is None else resolve_model_name(args.model)
    defaults = TINY_DEFAULTS if resolve_model_name(name) == "tiny" else CHAPTER_DEFAULTS
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    out = Path(args.output_dir) if args.output_dir else run_dir(name)
    ckpt_dir = out / "checkpoints"
    if args.resume and not (ckpt_dir / "checkpoint.pt").is_file():
        raise SystemExit(f"error: --resume: no checkpoint in {ckpt_dir}")
    device = get_device(args.device)
    torch.manual_seed(args.seed)

    data = load_instruction_data(args.data)
    if args.limit is not None:
        data = data[: args.limit]
    splits = split_data(data)
    if len(splits.train) < args.batch_size or not splits.validation or not splits.test:
        raise SystemExit(
            f"error: {len(data)} entries split into {len(splits.train)} train / "
            f"{len(splits.validation)} validation / {len(splits.test)} test; need at least "
            f"--batch-size ({args.batch_size}) train entries and one of each other split "
            "(raise --limit)"
        )
    loaders = make_loaders(
        splits,
        batch_size=args.batch_size,
        style=args.style,
        mask_prompt=args.mask_prompt,
        allowed_max_length=args.max_length,
        grouped=args.grouped,
        seed=args.seed,
    )
    print(
        f"Data: {len(splits.train)} train, {len(splits.validation)} validation, {len(splits.test)} test entries"
    )

    model, weights = build_model(name, pretrained=not args.random_init)
    label = describe_model(name, weights)
    model.to(device)
    print(f"Model: {label} on {device}")
    if args.max_length > model.cfg.context_length:
        raise SystemExit(
            f"error: --max-length {args.max_length} exceeds the model's context length {model.cfg.context_length}"
        )

    model.eval()
    initial = {
        split: calc_loss_loader(getattr(loaders, split), model, device, num_batches=args.eval_iter)
        for split in ("train", "validation")
    }
    print(f"Initial loss: train {initial['train']:.3f}, validation {initial['validation']:.3f}")

    config = TrainConfig(
        num_epochs=args.epochs,
        lr=args.lr,
        weight_decay=args.weight_decay,
        eval_freq=args.eval_freq,
        eval_iter=args.eval_iter,
        seed=args.seed,
        grad_accum_steps=args.grad_accum,
        max_grad_norm=args.max_grad_norm,
        schedule=args.schedule,
        warmup_steps=args.warmup_steps,
        bf16=args.bf16,
        early_stopping_patience=args.early_stopping,
        checkpoint_dir=None if args.no_checkpoint else str(ckpt_dir),
        checkpoint_every=None if args.no_checkpoint else args.checkpoint_every,
        progress=not args.quiet,
    )
    train_start = time.perf_counter()
    history = train(
        model,
        loaders,
        config=config,
        device=device,
        style=args.style,
        resume_from=ckpt_dir if args.resume else None,
        sample_entry=splits.validation[0],
    )
    train_minutes = (time.perf_counter() - train_start) / 60
    print(f"Training completed in {train_minutes:.2f} minutes.")

    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(out / "history.csv") as tmp:
        history.to_csv(tmp, index=False)
    fig = plot_losses(history, title=label)
    plot_files = save_loss_plot(fig, out / "loss-plot")

    test_entries = splits.test[: args.test_limit] if args.test_limit else splits.test
    model.eval()
    model_file = out / finetuned_path(name).name
    responses_file = out / RESPONSES_NAME
    generate_test_responses(
        model,
        test_entries,
        responses_file,
        model_name=name,
        checkpoint=model_file.name,
        style=args.style,
        max_new_tokens=args.max_new_tokens,
        batch_size=args.batch_size,
        progress=not args.quiet,
        extra_metadata={
            "weights": f"{weights}, fine-tuned",
            "description": label,
            "mask_prompt": args.mask_prompt,
        },
    )
    save_model(
        model,
        model_file,
        metadata={
            "base_model": name,
            "weights": f"{weights}, fine-tuned",
            "prompt_style": args.style,
            "mask_prompt": args.mask_prompt,
        },
    )

    best = history["val_loss"].idxmin() if history["val_loss"].notna().any() else None
    summary = {
        "model": label,
        "device": str(device),
        "entries": {
            "train": len(splits.train),
            "validation": len(splits.validation),
            "test": len(test_entries),
        },
        "initial_loss": initial,
        "final_loss": {
            "train": float(history["train_loss"].iloc[-1]),
            "validation": float(history["val_loss"].iloc[-1]),
        }
        if len(history)
        else None,
        "best_validation": {
            "step": int(history["step"][best]),
            "loss": float(history["val_loss"][best]),
        }
        if best is not None
        else None,
        "stopped_early": history.attrs.get("stopped_early", False),
        "steps": int(history["step"].iloc[-1]) + 1 if len(history) else 0,
        "training_minutes": round(train_minutes, 3),
        "total_minutes": round((time.perf_counter() - start) / 60, 3),
        "settings": {k: v for k, v in vars(args).items() if k != "quiet"},
        "files": sorted(
            p.name for p in [*plot_files, responses_file, model_file, out / "history.csv"]
        ),
    }
    tmp = out / ".summary.json.tmp"
    tmp.write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    tmp.replace(out / "summary.json")
    _print_summary(summary, out)
    return summary


def _print_summary(summary: dict, out: Path) -> None:
    print("\n=== Fine-tuning summary ===")
    print(f"Model:          {summary['model']}")
    init, final = summary["initial_loss"], summary["final_loss"]
    if final:
        print(f"Train loss:     {init['train']:.3f} -> {final['train']:.3f}")
        print(f"Val loss:       {init['validation']:.3f} -> {final['validation']:.3f}")
    if summary["best_validation"]:
        b = summary["best_validation"]
        print(
            f"Best val loss:  {b['loss']:.3f} at step {b['step']}"
            + (" (stopped early)" if summary["stopped_early"] else "")
        )
    print(
        f"Training time:  {summary['training_minutes']:.2f} min (total {summary['total_minutes']:.2f} min)"
    )
    print(f"Output folder:  {out}")
    for name in summary["files"]:
        print(f"  - {name}")


def main(argv: list[str] | None = None) -> int:
    """Entry point: parse options, run, print the summary; bad options exit with a message."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.model is not None:
        try:
            resolve_model_name(args.model)
        except ValueError as exc:
            parser.error(f"--model: {exc}")
    if args.warmup_steps < 0:
        parser.error("--warmup-steps must be >= 0")
    try:
        run(args)
    except KeyboardInterrupt:
        print(
            "\nInterrupted; rerun with --resume to continue from the saved checkpoint.",
            file=sys.stderr,
        )
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
