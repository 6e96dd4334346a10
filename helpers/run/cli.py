"""Command-line options of `python -m helpers.finetune`, turned into `FinetuneSettings`.

The training flags are generated from `TrainConfig`'s fields (help text, flag names and
checks come from the fields' metadata), so the command line and the dataclass cannot
drift apart. Model-dependent defaults (learning rate, epochs, subset, response length) come
from `helpers.config.run_defaults`, the one table the notebooks use too.
"""

from __future__ import annotations

import argparse
import math
import types
import typing
from collections.abc import Mapping
from dataclasses import MISSING, dataclass, fields
from pathlib import Path
from typing import Any

from helpers.config import CHAPTER_RUN_DEFAULTS, TINY_RUN_DEFAULTS, run_defaults
from helpers.config import resolve_model_name as _resolve
from helpers.lora.layers import TARGET_GROUPS
from helpers.prompts import PROMPT_STYLES, chapter_compat_from_env, get_style
from helpers.run.train_config import TrainConfig, field_problem, preset_train_config
from helpers.runtime import DEFAULT_MODEL, course_model, run_dir

DEFAULT_CHECKPOINT_MINUTES = 5.0  # a killed run loses at most this much work
LORA_TARGETS = ("attn", "mlp")  # the book's choice: every linear of every block


@dataclass(frozen=True)
class FinetuneSettings:
    """Everything one run of helpers.finetune needs, resolved and validated."""

    model: str  # canonical preset name
    output_dir: Path
    train: TrainConfig
    random_init: bool = False
    data: str | None = None  # dataset file (None: $COURSE_DATASET or the chapter's download)
    limit: int | None = None
    style: str = "alpaca"
    mask_prompt: bool = False
    batch_size: int = 8
    max_length: int = 1024
    grouped: bool = False
    resume: bool = False
    checkpoint: bool = True  # write training checkpoints into output_dir/checkpoints
    checkpoint_every: int | None = None  # steps
    checkpoint_minutes: float | None = DEFAULT_CHECKPOINT_MINUTES
    # (with checkpoint=False both periodic settings are None)
    max_new_tokens: int = 256
    sample_max_new_tokens: int = 35
    test_limit: int | None = None
    device: str | None = None
    progress: bool = True
    eval_batched: bool = False  # RunOptions.eval_batched: same losses, fewer forward passes
    # LoRA (appendix E, exercise 7.4): None trains every weight. alpha None: equal to the rank.
    lora_rank: int | None = None
    lora_alpha: float | None = None
    lora_targets: tuple[str, ...] = LORA_TARGETS
    lora_rank_scaled: bool = False  # the paper's alpha / rank instead of the book's alpha
    # Chapter-faithful mode: untied head, global-RNG shuffling, header-less test prompts.
    chapter_compat: bool = False

    def __post_init__(self) -> None:
        for name in ("batch_size", "max_length", "max_new_tokens", "sample_max_new_tokens",
                     "limit", "test_limit", "checkpoint_every", "checkpoint_minutes"):  # fmt: skip
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ValueError(f"FinetuneSettings.{name} must be > 0, got {value!r}")
        get_style(self.style)  # ValueError listing the valid styles
        periodic = self.checkpoint_every is not None or self.checkpoint_minutes is not None
        if periodic and not self.checkpoint:
            raise ValueError("FinetuneSettings: periodic checkpoints need checkpoint=True")
        if self.chapter_compat and self.grouped:
            raise ValueError("FinetuneSettings: chapter_compat=True needs grouped=False")
        self._check_lora()

    def _check_lora(self) -> None:
        # Resolves lora_alpha (None -> the rank) and lora_targets (any iterable -> tuple).
        rank, targets = self.lora_rank, tuple(self.lora_targets)
        if rank is None:
            if self.lora_alpha is not None or self.lora_rank_scaled or targets != LORA_TARGETS:
                raise ValueError("FinetuneSettings: the other lora_* settings need lora_rank")
            return
        if isinstance(rank, bool) or not isinstance(rank, int) or rank <= 0:
            raise ValueError(f"FinetuneSettings.lora_rank must be a positive integer, got {rank!r}")
        alpha = float(rank if self.lora_alpha is None else self.lora_alpha)
        if not (math.isfinite(alpha) and alpha > 0):
            raise ValueError(f"FinetuneSettings.lora_alpha must be > 0, got {self.lora_alpha!r}")
        unknown = [t for t in targets if t not in TARGET_GROUPS]
        if unknown or not targets:
            raise ValueError(f"FinetuneSettings.lora_targets: choose from {list(TARGET_GROUPS)}, "
                             f"got {list(targets)}")  # fmt: skip
        object.__setattr__(self, "lora_alpha", alpha)  # frozen: resolved once, here
        object.__setattr__(self, "lora_targets", targets)

    @property
    def checkpoint_dir(self) -> Path:
        """Where the training checkpoint of this run goes."""
        return self.output_dir / "checkpoints"


def _parse(kind: type, cls: type | None = None, name: str = "") -> Any:
    # argparse `type=`: convert, then run the dataclass field's own check (if any).
    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a {kind.__name__}, got {text!r}") from None
        problem = field_problem(cls, name, value) if cls is not None else None
        if problem is None and cls is None and not value > 0:
            problem = f"must be > 0, got {text}"
        if problem:
            raise argparse.ArgumentTypeError(problem)
        return value

    return parse


def _base_type(hint: Any) -> Any:
    # `int | None` -> int: the flag converts to the non-None type.
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        return next(a for a in typing.get_args(hint) if a is not type(None))
    return hint


def _default_note(name: str, default: Any) -> str:
    # Model-dependent defaults come from the run_defaults table; say both values.
    if name in {f.name for f in fields(CHAPTER_RUN_DEFAULTS)}:
        chapter, tiny = getattr(CHAPTER_RUN_DEFAULTS, name), getattr(TINY_RUN_DEFAULTS, name)
        if chapter != tiny:
            return f" (default: {'all' if chapter is None else chapter}; tiny: {tiny})"
    return "" if default is None or default is False else f" (default: {default})"


def add_config_flags(parser: argparse.ArgumentParser, cls: type = TrainConfig) -> None:
    """One flag per field of the dataclass `cls`, from its metadata; defaults stay None."""
    group = parser.add_argument_group(f"training ({cls.__name__})")
    hints = typing.get_type_hints(cls)
    for f in fields(cls):
        meta, kind = f.metadata, _base_type(hints[f.name])
        flag = meta.get("flag") or "--" + f.name.replace("_", "-")
        default = None if f.default is MISSING else f.default
        help_text = meta.get("help", "") + _default_note(f.name, default)
        if kind is bool:
            action = argparse.BooleanOptionalAction if default else "store_true"
            group.add_argument(flag, dest=f.name, action=action, default=None, help=help_text)
            continue
        group.add_argument(flag, dest=f.name, type=_parse(kind, cls, f.name), default=None,
                           choices=meta.get("choices"), metavar=meta.get("metavar"),
                           help=help_text)  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    """The command-line options; training flags are generated from TrainConfig."""
    p = argparse.ArgumentParser(
        prog="python -m helpers.finetune",
        description="Instruction fine-tune a GPT-2 model on the chapter's dataset and write the "
        "loss plot, test-split responses and the fine-tuned model into --output-dir.",
    )
    add = p.add_argument
    add("--model", default=None, help="preset: gpt2-small, gpt2-medium, gpt2-large, gpt2-xl "
        f"or tiny (default: $COURSE_MODEL, else {DEFAULT_MODEL})")  # fmt: skip
    add("--random-init", action="store_true",
        help="random weights (seeded by --seed) instead of OpenAI's; tiny is always random")  # fmt: skip
    add(
        "--data", default=None, help="dataset JSON/JSONL (default: $COURSE_DATASET or the download)"
    )
    add("--limit", type=_parse(int), default=None,
        help="use only the first N dataset entries" + _default_note("limit", None))  # fmt: skip
    add("--style", default="alpaca", choices=list(PROMPT_STYLES), help="prompt style")
    add("--mask-prompt", action="store_true", help="compute the loss on response tokens only")
    add("--batch-size", type=_parse(int), default=8, help="batch size (default: 8)")
    add(
        "--max-length",
        type=_parse(int),
        default=1024,
        help="truncate examples to N tokens (default: 1024)",
    )
    add("--grouped", action="store_true", help="length-grouped batches (less padding)")
    add("--chapter-compat", action=argparse.BooleanOptionalAction, default=None,
        help="chapter-faithful mode: untied output head, the chapter's shuffling and test "
        "prompts (default: $COURSE_CHAPTER_COMPAT, else off)")  # fmt: skip
    lora = p.add_argument_group("LoRA (appendix E; default: full fine-tuning)")
    lora.add_argument("--lora-rank", type=_parse(int), default=None, metavar="R",
                      help="freeze the model and train rank-R LoRA adapters (the book: 16)")  # fmt: skip
    lora.add_argument("--lora-alpha", type=_parse(float), default=None, metavar="A",
                      help="LoRA scaling alpha (default: equal to --lora-rank)")  # fmt: skip
    lora.add_argument("--lora-targets", nargs="+", choices=list(TARGET_GROUPS), default=None,
                      help=f"linears to adapt (default: {' '.join(LORA_TARGETS)})")  # fmt: skip
    lora.add_argument("--lora-rank-scaled", action="store_true",
                      help="scale by alpha / rank (the LoRA paper) instead of alpha (the book)")  # fmt: skip
    add_config_flags(p)
    run = p.add_argument_group("checkpoints and output")
    run.add_argument("--checkpoint-every", type=_parse(int), default=None, metavar="STEPS",
                     help="also checkpoint every STEPS optimizer steps")  # fmt: skip
    run.add_argument("--checkpoint-minutes", type=_parse(float), default=None,
                     metavar="MIN", help="checkpoint every MIN minutes of training "
                     f"(default: {DEFAULT_CHECKPOINT_MINUTES:g}; one is always saved at the end)")  # fmt: skip
    run.add_argument("--no-checkpoint", action="store_true", help="write no training checkpoints")
    run.add_argument(
        "--resume", action="store_true", help="continue from --output-dir's checkpoint"
    )
    run.add_argument(
        "--output-dir", default=None, help="default: runs/<model>-sft in the repository"
    )
    run.add_argument("--max-new-tokens", type=_parse(int), default=None,
                     help="test-split response length" + _default_note("max_new_tokens", None))  # fmt: skip
    run.add_argument("--test-limit", type=_parse(int), default=None,
                     help="answer only the first N test entries")  # fmt: skip
    run.add_argument("--device", default=None, help="cpu, cuda, mps (default: best available)")
    run.add_argument("--quiet", action="store_true", help="no progress bars")
    run.add_argument("--eval-batched", action="store_true",
                     help="each evaluation in one forward pass per split (same losses; "
                     "faster on a GPU, more memory)")  # fmt: skip
    run.add_argument("--debug", action="store_true", help="show tracebacks of expected errors")
    return p


def _check_flags(args: argparse.Namespace) -> bool:
    """Refuse contradicting flags (no flag may be silently ignored); the chapter-faithful switch."""
    periodic = args.checkpoint_every is not None or args.checkpoint_minutes is not None
    if args.no_checkpoint and periodic:
        raise ValueError("--no-checkpoint contradicts --checkpoint-every/--checkpoint-minutes")
    lora_given = {"--lora-alpha": args.lora_alpha is not None,
                  "--lora-targets": args.lora_targets is not None,
                  "--lora-rank-scaled": args.lora_rank_scaled}  # fmt: skip
    if args.lora_rank is None and any(lora_given.values()):
        raise ValueError(f"{'/'.join(f for f, on in lora_given.items() if on)} needs --lora-rank")
    compat = chapter_compat_from_env() if args.chapter_compat is None else args.chapter_compat
    if compat and args.grouped:
        source = "--chapter-compat" if args.chapter_compat else "$COURSE_CHAPTER_COMPAT"
        raise ValueError(f"{source} contradicts --grouped (the chapter batches in random order)")
    return compat


def settings_from_args(args: argparse.Namespace) -> FinetuneSettings:
    """Resolve defaults (model-dependent ones from run_defaults) and validate; ValueError if bad."""
    name = course_model() if args.model is None else _resolve(args.model)
    preset = run_defaults(name)

    def pick(value: Any, default: Any) -> Any:
        return default if value is None else value

    train_values: Mapping[str, Any] = {
        f.name: getattr(args, f.name)
        for f in fields(TrainConfig)
        if getattr(args, f.name) is not None
    }
    compat = _check_flags(args)
    minutes = pick(args.checkpoint_minutes, DEFAULT_CHECKPOINT_MINUTES)
    train = preset_train_config(name, **train_values)
    return FinetuneSettings(
        model=name,
        output_dir=Path(args.output_dir) if args.output_dir else run_dir(name),
        train=train,
        random_init=args.random_init,
        data=args.data,
        limit=pick(args.limit, preset.limit),
        style=args.style,
        mask_prompt=args.mask_prompt,
        batch_size=args.batch_size,
        max_length=args.max_length,
        grouped=args.grouped,
        resume=args.resume,
        checkpoint=not args.no_checkpoint,
        checkpoint_every=args.checkpoint_every,
        checkpoint_minutes=None if args.no_checkpoint else minutes,
        max_new_tokens=pick(args.max_new_tokens, preset.max_new_tokens),
        sample_max_new_tokens=preset.sample_max_new_tokens,
        test_limit=args.test_limit,
        device=args.device,
        progress=not args.quiet,
        eval_batched=args.eval_batched,
        lora_rank=args.lora_rank,
        lora_alpha=args.lora_alpha,
        lora_targets=tuple(dict.fromkeys(args.lora_targets or LORA_TARGETS)),
        lora_rank_scaled=args.lora_rank_scaled,
        chapter_compat=compat,
    )
