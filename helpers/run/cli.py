"""Command-line options of `python -m helpers.finetune`, turned into `FinetuneSettings`.

Every flag is generated from a settings dataclass's fields (help text, flag names, choices and
checks come from the fields' metadata; helpers.run.fields): the run's own settings from
`FinetuneSettings`, the training flags from `TrainConfig`, the --lora-* flags from
`LoRAConfig`. So the command line and the dataclasses cannot drift apart. Model-dependent
defaults (learning rate, epochs, subset, response length) come from
`helpers.config.run_defaults`, the one table the notebooks use too.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from pathlib import Path

from helpers.config import CHAPTER_RUN_DEFAULTS, TINY_RUN_DEFAULTS, run_defaults
from helpers.config import resolve_model_name as _resolve
from helpers.lora.layers import LoRAConfig
from helpers.prompts import PROMPT_STYLES, chapter_compat_from_env
from helpers.run.fields import (
    add_dataclass_flags,
    boolean,
    dropout_rate,
    flag_values,
    int_at_least_zero,
    one_of,
    optional,
    positive_int,
    positive_number,
    setting,
    setting_like,
    text,
    validate,
)
from helpers.run.train_config import RunOptions, TrainConfig, preset_train_config
from helpers.runtime import DEFAULT_MODEL, course_model, device_problem, run_dir

DEFAULT_CHECKPOINT_MINUTES = 5.0  # a killed run loses at most this much work
# Model-dependent defaults, shown in --help as "(default: chapter; tiny: tiny's)".
RUN_PRESETS = {"default": CHAPTER_RUN_DEFAULTS, "tiny": TINY_RUN_DEFAULTS}
_CHECKPOINT_FLAGS = ("checkpoint_every", "checkpoint_minutes")


@dataclass(frozen=True, kw_only=True)
class FinetuneSettings:
    """Everything one run of helpers.finetune needs, resolved and validated.

    Each field with help text is a command-line flag (--field-name unless it names its own).
    """

    model: str = setting(  # the canonical preset name (settings_from_args resolves aliases)
        help="preset: gpt2-small, gpt2-medium, gpt2-large, gpt2-xl or tiny "
        f"(default: $COURSE_MODEL, else {DEFAULT_MODEL})"
    )
    random_init: bool = setting(
        False, "random weights (seeded by --seed) instead of OpenAI's; tiny is always random"
    )
    drop_rate: float | None = setting(
        None,
        "dropout rate while training (default: the preset's, 0.1 for tiny and 0 for GPT-2 as "
        "in the chapter)",
        optional(dropout_rate),
    )
    data: str | None = setting(
        None, "dataset JSON/JSONL (default: $COURSE_DATASET or the download)", optional(text)
    )
    limit: int | None = setting(
        None, "use only the first N dataset entries", optional(positive_int), none="all"
    )
    style: str = setting(
        "alpaca", "prompt style", one_of(*PROMPT_STYLES), choices=tuple(PROMPT_STYLES)
    )
    mask_prompt: bool = setting(False, "compute the loss on response tokens only", boolean)
    batch_size: int = setting(
        8,
        "batch size (under torchrun: the global batch, split between the processes)",
        positive_int,
    )
    max_length: int = setting(1024, "truncate examples to N tokens", positive_int)
    grouped: bool = setting(False, "length-grouped batches (less padding)", boolean)
    # Chapter-faithful mode: untied head, global-RNG shuffling, header-less test prompts.
    chapter_compat: bool = setting(
        False,
        "chapter-faithful mode: untied output head, the chapter's shuffling and test prompts "
        "(default: $COURSE_CHAPTER_COMPAT, else off)",
        boolean,
        action=argparse.BooleanOptionalAction,
    )
    train: TrainConfig = field(default_factory=TrainConfig)
    # LoRA (appendix E, exercise 7.4): None trains every weight.
    lora: LoRAConfig | None = None
    checkpoint_every: int | None = setting(
        None,
        "also checkpoint every STEPS optimizer steps",
        optional(positive_int),
        metavar="STEPS",
    )
    checkpoint_minutes: float | None = setting(
        DEFAULT_CHECKPOINT_MINUTES,
        "checkpoint every MIN minutes of training; one is always saved at the end",
        optional(positive_number),
        metavar="MIN",
    )
    # Write training checkpoints into output_dir/checkpoints (False: both periodic ones None).
    checkpoint: bool = setting(
        True, "write no training checkpoints", boolean, flag="--no-checkpoint"
    )
    resume: bool = setting(False, "continue from --output-dir's checkpoint", boolean)
    output_dir: Path = setting(help="default: runs/<model>-sft in the repository")
    max_new_tokens: int = setting(256, "test-split response length", positive_int)
    sample_max_new_tokens: int = setting(35, check=positive_int, cli=False)  # per-epoch sample
    no_repeat_ngram: int = setting(
        0,
        "answers never repeat an N-token sequence (0: off, the chapter's greedy decoding)",
        int_at_least_zero,
        metavar="N",
    )
    test_limit: int | None = setting(
        None, "answer only the first N test entries", optional(positive_int)
    )
    device: str | None = setting(
        None, "cpu, cuda, cuda:N, mps (default: best available)", device_problem
    )
    progress: bool = setting(True, "no progress bars", boolean, flag="--quiet")
    # RunOptions.eval_batched: the same losses, fewer forward passes.
    eval_batched: bool = setting(
        False,
        "each evaluation in one forward pass per split (same losses; faster on a GPU, more memory)",
        boolean,
    )
    deterministic: bool = setting_like(RunOptions, "deterministic")

    def __post_init__(self) -> None:
        validate(self)
        periodic = self.checkpoint_every is not None or self.checkpoint_minutes is not None
        if periodic and not self.checkpoint:
            raise ValueError("FinetuneSettings: periodic checkpoints need checkpoint=True")
        if self.chapter_compat and self.grouped:
            raise ValueError("FinetuneSettings: chapter_compat=True needs grouped=False")

    @property
    def checkpoint_dir(self) -> Path:
        """Where the training checkpoint of this run goes."""
        return self.output_dir / "checkpoints"


def build_parser() -> argparse.ArgumentParser:
    """The command-line options, generated from FinetuneSettings, LoRAConfig and TrainConfig."""
    parser = argparse.ArgumentParser(
        prog="python -m helpers.finetune",
        description="Instruction fine-tune a GPT-2 model on the chapter's dataset and write the "
        "loss plot, test-split responses and the fine-tuned model into --output-dir.",
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks of expected errors")
    add_dataclass_flags(parser, FinetuneSettings, "run (FinetuneSettings)", presets=RUN_PRESETS)
    lora_title = "LoRA (LoRAConfig; appendix E, exercise 7.4; default: full fine-tuning)"
    add_dataclass_flags(parser, LoRAConfig, lora_title, prefix="lora_")
    add_dataclass_flags(parser, TrainConfig, "training (TrainConfig)", presets=RUN_PRESETS)
    return parser


def _check_flags(args: argparse.Namespace) -> bool:
    """Refuse contradicting flags (no flag may be silently ignored); the chapter-faithful switch."""
    if args.checkpoint is False and any(getattr(args, n) is not None for n in _CHECKPOINT_FLAGS):
        raise ValueError("--no-checkpoint contradicts --checkpoint-every/--checkpoint-minutes")
    lora = flag_values(args, LoRAConfig, prefix="lora_")
    if lora and "rank" not in lora:
        given = "/".join("--lora-" + name.replace("_", "-") for name in lora)
        raise ValueError(f"{given} needs --lora-rank")
    compat = chapter_compat_from_env() if args.chapter_compat is None else args.chapter_compat
    if compat and args.grouped:
        source = "--chapter-compat" if args.chapter_compat else "$COURSE_CHAPTER_COMPAT"
        raise ValueError(f"{source} contradicts --grouped (the chapter batches in random order)")
    return compat


def _lora_config(args: argparse.Namespace) -> LoRAConfig | None:
    """The --lora-* flags as a LoRAConfig (alpha defaults to the rank); None without --lora-rank."""
    given = flag_values(args, LoRAConfig, prefix="lora_")
    if "rank" not in given:
        return None
    return LoRAConfig(**{"alpha": float(given["rank"]), **given})


def settings_from_args(args: argparse.Namespace) -> FinetuneSettings:
    """Resolve defaults (model-dependent ones from run_defaults) and validate; ValueError if bad."""
    name = course_model() if args.model is None else _resolve(args.model)
    preset = run_defaults(name)
    compat = _check_flags(args)
    given = flag_values(args, FinetuneSettings)
    given["chapter_compat"] = compat
    if not given.get("checkpoint", True):
        given["checkpoint_minutes"] = None  # no periodic checkpoints either
    return FinetuneSettings(
        **{
            "limit": preset.limit,
            "max_new_tokens": preset.max_new_tokens,
            "sample_max_new_tokens": preset.sample_max_new_tokens,
            "no_repeat_ngram": preset.no_repeat_ngram,
            **given,
            "model": name,
            "output_dir": Path(args.output_dir) if args.output_dir else run_dir(name),
            "train": preset_train_config(name, **flag_values(args, TrainConfig)),
            "lora": _lora_config(args),
        }
    )
