"""DPO headless: `python -m helpers.dpo --sft-checkpoint PATH --data PATH --output-dir DIR`.

instruction-tuned model -> policy + frozen reference -> preference pairs -> DPO training ->
history, plot, validation answers before and after, the tuned model and a summary, all in
one output folder (default `runs/<model>-dpo`; helpers.dpo.outputs writes the files).
Expected problems (missing files, bad data, a checkpoint that does not fit) end with one
`error: ...` line and exit code 2.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from helpers.config import resolve_model_name
from helpers.runtime import course_model, describe_model, finetuned_path, get_device, model_slug


class UsageError(Exception):
    """An expected problem with the inputs: reported as one line, exit code 2."""


def dpo_run_dir(name: str) -> Path:
    """Default output folder: `runs/<slug>-dpo` beside notebook 04's `runs/<slug>-sft`."""
    return finetuned_path(name).parent.with_name(f"{model_slug(name)}-dpo")


def _number(kind: type, minimum: float = 0.0, inclusive: bool = False) -> Any:
    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a {kind.__name__}, got {text!r}") from None
        if value < minimum or (value == minimum and not inclusive):
            raise argparse.ArgumentTypeError(
                f"must be {'>=' if inclusive else '>'} {minimum}, got {text}"
            )
        return value

    return parse


def build_parser() -> argparse.ArgumentParser:
    """The command-line options; left out, they take `dpo_run_defaults(model)` (book or tiny)."""
    pos_int, pos_float = _number(int), _number(float)
    p = argparse.ArgumentParser(
        prog="python -m helpers.dpo",
        description="Preference-tune an instruction fine-tuned GPT-2 with DPO and write the "
        "history, plot, validation answers and the tuned model into --output-dir.",
    )
    add = p.add_argument
    add(
        "--model",
        default=None,
        help="preset (default: the checkpoint's base model, else $COURSE_MODEL)",
    )
    add(
        "--sft-checkpoint",
        default=None,
        help="instruction-tuned model (default: runs/<model>-sft/<model>-sft.safetensors)",
    )
    add(
        "--data",
        default=None,
        help="preference pairs JSON/JSONL (default: $COURSE_PREFERENCES or the book's download)",
    )
    add("--output-dir", default=None, help="default: runs/<model>-dpo in the repository")
    add("--resume", action="store_true", help="continue from the checkpoint in --output-dir")
    add(
        "--limit",
        type=pos_int,
        default=None,
        help="use the first N pairs (default: all; tiny: 60)",
    )
    add("--style", default="alpaca", choices=["alpaca", "phi3"], help="prompt style")
    add("--epochs", type=pos_int, default=1, help="training epochs (default: 1)")
    add(
        "--lr", type=pos_float, default=None, help="AdamW learning rate (default: 5e-6; tiny: 1e-3)"
    )
    add(
        "--weight-decay",
        type=_number(float, 0.0, True),
        default=0.01,
        help="AdamW weight decay (default: 0.01)",
    )
    add(
        "--beta",
        type=pos_float,
        default=0.1,
        help="DPO beta: how far from the reference (default: 0.1)",
    )
    add("--batch-size", type=pos_int, default=None, help="pairs per batch (default: 8; tiny: 4)")
    add(
        "--max-length",
        type=pos_int,
        default=None,
        help="cut sequences to N tokens (default: 1024; tiny: 128)",
    )
    add(
        "--eval-freq",
        type=pos_int,
        default=None,
        help="evaluate every N steps (default: 5; tiny: 4)",
    )
    add(
        "--eval-iter",
        type=pos_int,
        default=None,
        help="batches per evaluation (default: 5; tiny: 2)",
    )
    add("--max-steps", type=pos_int, default=None, help="stop after N steps in all (resumable)")
    add("--checkpoint-every", type=pos_int, default=None, help="also checkpoint every N steps")
    add(
        "--max-new-tokens",
        type=pos_int,
        default=None,
        help="answer length (default: 256; tiny: 32)",
    )
    add(
        "--response-limit",
        type=pos_int,
        default=None,
        help="answer only the first N validation prompts",
    )
    add("--device", default=None, help="cpu, cuda, mps (default: best available)")
    add("--seed", type=int, default=123, help="shuffling seed (default: 123)")
    add("--quiet", action="store_true", help="no progress bars")
    return p


def resolve_model(args: argparse.Namespace) -> tuple[str, Path]:
    """(preset, instruction-tuned checkpoint), checked against each other."""
    from helpers.weights import read_metadata

    name = resolve_model_name(args.model) if args.model else None
    if args.sft_checkpoint is None:
        name = name or course_model()
        sft = finetuned_path(name)
    else:
        sft = Path(args.sft_checkpoint)
    if not sft.is_file():
        raise UsageError(
            f"no instruction-tuned model at {sft} (run `python -m helpers.finetune"
            f"{' --model ' + name if name else ''}` or notebook 04 first, or pass --sft-checkpoint)"
        )
    try:
        base = read_metadata(sft).get("base_model")
    except Exception as exc:  # not a safetensors file
        raise UsageError(f"{sft} is not a course model file: {exc}") from None
    if base and name and resolve_model_name(base) != name:
        raise UsageError(f"{sft} was fine-tuned from {base}, not {name} (check --model)")
    return name or (resolve_model_name(base) if base else course_model()), sft


def _splits(args: argparse.Namespace) -> Any:
    from helpers.data import split_data
    from helpers.dpo.preferences import load_preferences

    data = load_preferences(args.data)[: args.limit]
    splits = split_data(data)
    if len(splits.train) < args.batch_size or not splits.validation:
        raise UsageError(
            f"{len(data)} pairs give {len(splits.train)} train / {len(splits.validation)} "
            f"validation; need --batch-size ({args.batch_size}) train pairs and one validation "
            "pair (raise --limit)"
        )
    return splits


def run(args: argparse.Namespace) -> dict:
    """Train with parsed `args`; returns the summary it also writes to summary.json."""
    from helpers.dpo.checkpoints import dpo_checkpoint_path
    from helpers.dpo.loss import freeze_reference, make_preference_loaders
    from helpers.dpo.outputs import (
        final_metrics,
        save_dpo_model,
        write_history,
        write_responses,
        write_summary,
    )
    from helpers.dpo.train import DPOConfig, dpo_run_defaults, train_dpo
    from helpers.weights import load_model

    start = time.perf_counter()
    name, sft = resolve_model(args)
    for key, value in asdict(dpo_run_defaults(name)).items():
        if getattr(args, key) is None:  # options left out take the model's run defaults
            setattr(args, key, value)
    out = Path(args.output_dir) if args.output_dir else dpo_run_dir(name)
    ckpt_dir = out / "checkpoints"
    if args.resume and not dpo_checkpoint_path(ckpt_dir).is_file():
        raise UsageError(f"--resume: no DPO checkpoint in {ckpt_dir}")
    splits = _splits(args)
    device = get_device(args.device)
    policy = load_model(sft, device=device)
    reference = freeze_reference(policy)
    label = describe_model(name, f"instruction-tuned {sft.name}, then DPO")
    print(f"Model: {label} on {device}")
    print(f"Pairs: {len(splits.train)} train, {len(splits.validation)} validation")
    loaders = make_preference_loaders(
        splits,
        batch_size=args.batch_size,
        style=args.style,
        allowed_max_length=min(args.max_length, policy.cfg.context_length),
        device=device,
        seed=args.seed,
    )
    config = DPOConfig(
        num_epochs=args.epochs, lr=args.lr, weight_decay=args.weight_decay, beta=args.beta,
        eval_freq=args.eval_freq, eval_iter=args.eval_iter, seed=args.seed,
        max_steps=args.max_steps, checkpoint_dir=str(ckpt_dir),
        checkpoint_every=args.checkpoint_every, progress=not args.quiet,
    )  # fmt: skip
    history = train_dpo(policy, reference, loaders.train, loaders.validation, config=config,
                        device=device, resume_from=ckpt_dir if args.resume else None)  # fmt: skip

    out.mkdir(parents=True, exist_ok=True)
    files = write_history(history, out, title=label)
    meta = {"model": name, "description": label, "sft_checkpoint": str(sft), "beta": args.beta,
            "max_new_tokens": args.max_new_tokens, "decoding": "greedy"}  # fmt: skip
    entries = splits.validation[: args.response_limit]
    gen = dict(style=args.style, max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
               progress=not args.quiet)  # fmt: skip
    files.append(write_responses(out, reference, policy, entries, metadata=meta, **gen))
    files.append(save_dpo_model(policy, out, name=name, sft=sft, style=args.style, beta=args.beta))
    summary = {
        "model": label,
        "device": str(device),
        "entries": {"train": len(splits.train), "validation": len(splits.validation)},
        "steps": int(history.attrs.get("steps", 0)),
        "final": final_metrics(history),
        "total_minutes": round((time.perf_counter() - start) / 60, 3),
        "settings": {k: v for k, v in vars(args).items() if k != "quiet"},
        "files": sorted(p.name for p in files),
    }
    write_summary(summary, out)
    return summary


def main(argv: list[str] | None = None) -> int:
    """Entry point: 0 on success, 2 with one `error:` line for expected problems, 130 on Ctrl-C."""
    from helpers.data import DatasetError, DownloadError
    from helpers.dpo.checkpoints import DPOCheckpointError
    from helpers.weights import CheckpointMismatchError

    parser = build_parser()
    args = parser.parse_args(argv)
    if args.model is not None:
        try:
            resolve_model_name(args.model)
        except ValueError as exc:
            parser.error(f"--model: {exc}")
    try:
        run(args)
    except (
        UsageError,
        DatasetError,
        DownloadError,
        DPOCheckpointError,
        CheckpointMismatchError,
    ) as exc:
        message = " ".join(str(exc).split())
        print(f"error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(
            "\nInterrupted; rerun with --resume to continue from the saved checkpoint.",
            file=sys.stderr,
        )
        return 130
    return 0
