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
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from helpers.config import resolve_model_name
from helpers.dpo.train import BOOK_DPO_DEFAULTS, TINY_DPO_DEFAULTS, DPOConfig, dpo_run_defaults
from helpers.prompts import PROMPT_STYLES, chapter_compat_from_env
from helpers.run.fields import (
    add_dataclass_flags,
    boolean,
    flag_values,
    one_of,
    optional,
    positive_int,
    setting,
    setting_like,
    text,
    validate,
)
from helpers.run.train_config import RunOptions

if TYPE_CHECKING:  # imported when needed: `--help` stays fast
    from helpers.batching import Loaders
    from helpers.model import GPTModel
from helpers.runtime import (
    course_model,
    describe_model,
    device_problem,
    finetuned_path,
    get_device,
    model_slug,
)


class UsageError(Exception):
    """An expected problem with the inputs: reported as one line, exit code 2."""


def dpo_run_dir(name: str) -> Path:
    """Default output folder: `runs/<slug>-dpo` beside notebook 04's `runs/<slug>-sft`."""
    return finetuned_path(name).parent.with_name(f"{model_slug(name)}-dpo")


@dataclass(frozen=True, kw_only=True)
class DPOSettings:
    """One run of `python -m helpers.dpo`, validated; each field is a flag (--field-name).

    Fields left None take `dpo_run_defaults(model)` (the book's or tiny's) once the model is
    known (`with_run_defaults`). The hyper-parameters share DPOConfig's help, check and
    default (`setting_like`), so each is stated once.
    """

    model: str | None = setting(
        None, "preset (default: the checkpoint's base model, else $COURSE_MODEL)", optional(text)
    )
    sft_checkpoint: str | None = setting(
        None,
        "instruction-tuned model (default: runs/<model>-sft/<model>-sft.safetensors)",
        optional(text),
    )
    data: str | None = setting(
        None,
        "preference pairs JSON/JSONL (default: $COURSE_PREFERENCES or the book's download)",
        optional(text),
    )
    output_dir: str | None = setting(
        None, "default: runs/<model>-dpo in the repository", optional(text)
    )
    resume: bool = setting(False, "continue from the checkpoint in --output-dir", boolean)
    limit: int | None = setting(None, "use the first N pairs", optional(positive_int), none="all")
    style: str = setting(
        "alpaca", "prompt style", one_of(*PROMPT_STYLES), choices=tuple(PROMPT_STYLES)
    )
    # Chapter-faithful mode, as helpers.finetune's: here the book's DPO notebook.
    chapter_compat: bool | None = setting(
        None,
        "chapter-faithful mode: the book's pair batches (padded to the longest + 1, "
        "'### Response:' counted as answer), its shuffling (global random state after "
        "torch.manual_seed(seed)) and its rewards (log-ratio, not beta x log-ratio) "
        "(default: $COURSE_CHAPTER_COMPAT, else off)",
        optional(boolean),
        action=argparse.BooleanOptionalAction,
    )
    epochs: int = setting_like(DPOConfig, "num_epochs")
    lr: float | None = setting_like(DPOConfig, "lr", None)
    weight_decay: float = setting_like(DPOConfig, "weight_decay")
    beta: float = setting_like(DPOConfig, "beta")
    batch_size: int | None = setting(
        None,
        "pairs per batch (under torchrun: the global batch, split between the processes)",
        optional(positive_int),
    )
    max_length: int | None = setting(None, "cut sequences to N tokens", optional(positive_int))
    eval_freq: int | None = setting_like(DPOConfig, "eval_freq", None)
    eval_iter: int | None = setting_like(DPOConfig, "eval_iter", None)
    max_steps: int | None = setting(
        None, "stop after N steps in all (resumable)", optional(positive_int)
    )
    checkpoint_every: int | None = setting(
        None, "also checkpoint every N steps", optional(positive_int)
    )
    max_new_tokens: int | None = setting(None, "answer length", optional(positive_int))
    response_limit: int | None = setting(
        None, "answer only the first N validation prompts", optional(positive_int)
    )
    device: str | None = setting(
        None, "cpu, cuda, cuda:N, mps (default: best available)", device_problem
    )
    seed: int = setting_like(DPOConfig, "seed")
    deterministic: bool = setting_like(RunOptions, "deterministic")
    quiet: bool = setting(False, "no progress bars", boolean)

    def __post_init__(self) -> None:
        validate(self)

    def with_run_defaults(self, name: str) -> DPOSettings:
        """A copy whose fields left None take `dpo_run_defaults(name)`."""
        defaults = asdict(dpo_run_defaults(name))
        return replace(self, **{k: v for k, v in defaults.items() if getattr(self, k) is None})


def build_parser() -> argparse.ArgumentParser:
    """The command-line options, generated from DPOSettings; left out, they are its defaults."""
    parser = argparse.ArgumentParser(
        prog="python -m helpers.dpo",
        description="Preference-tune an instruction fine-tuned GPT-2 with DPO and write the "
        "history, plot, validation answers and the tuned model into --output-dir.",
    )
    presets = {"default": BOOK_DPO_DEFAULTS, "tiny": TINY_DPO_DEFAULTS}
    title = "DPO run (DPOSettings; model-dependent defaults: the book's, or tiny's)"
    add_dataclass_flags(parser, DPOSettings, title, presets=presets, field_defaults=True)
    return parser


def settings_from_args(args: argparse.Namespace) -> DPOSettings:
    """The parsed flags as validated DPOSettings (run defaults not yet applied)."""
    return DPOSettings(**flag_values(args, DPOSettings))


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


def _settings(args: argparse.Namespace, checkpoint_dir: Path) -> tuple[DPOConfig, RunOptions]:
    """The run's DPOConfig (hyper-parameters) and RunOptions (checkpoints, progress)."""
    from helpers.run.cli import DEFAULT_CHECKPOINT_MINUTES
    from helpers.run.train_config import RunOptions

    config = DPOConfig(
        num_epochs=args.epochs,
        lr=args.lr,
        weight_decay=args.weight_decay,
        beta=args.beta,
        eval_freq=args.eval_freq,
        eval_iter=args.eval_iter,
        seed=args.seed,
    )
    options = RunOptions(
        checkpoint_dir=checkpoint_dir,
        checkpoint_every=args.checkpoint_every,
        checkpoint_minutes=DEFAULT_CHECKPOINT_MINUTES,  # a killed run loses at most this much
        max_steps=args.max_steps,
        progress=not args.quiet,
        deterministic=args.deterministic,
    )
    return config, options


def _loaders(args: argparse.Namespace, splits: Any, policy: GPTModel, device: Any) -> Loaders:
    from helpers.dpo.loss import make_preference_loaders

    return make_preference_loaders(
        splits,
        batch_size=args.batch_size,
        style=args.style,
        allowed_max_length=min(args.max_length, policy.cfg.context_length),
        device=device,
        seed=args.seed,
        chapter_compat=args.chapter_compat,
    )


def _write_outputs(
    args: argparse.Namespace,
    out: Path,
    models: tuple[GPTModel, GPTModel],
    entries: list[dict[str, str]],
    meta: dict[str, Any],
) -> list[Path]:
    """`entries`' answers by the reference and the DPO model, and that model; the files."""
    from helpers.dpo.outputs import save_dpo_model, write_responses
    from helpers.generate import GenerationSettings

    reference, policy = models
    gen = GenerationSettings(
        style=args.style,
        max_new_tokens=args.max_new_tokens,
        batch_size=args.batch_size,
        chapter_compat=args.chapter_compat,
    )
    responses = write_responses(
        out, reference, policy, entries, metadata=meta, settings=gen, progress=not args.quiet
    )
    sft = Path(meta["sft_checkpoint"])
    model = save_dpo_model(
        policy, out, name=meta["model"], sft=sft, style=args.style, beta=args.beta
    )
    return [responses, model]


# Flags that may differ between the nodes of a distributed run (paths, device, output).
_LOCAL_FLAGS = ("sft_checkpoint", "data", "output_dir", "device", "quiet")


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Train with parsed `args`; returns the summary it also writes to summary.json.

    Under `torchrun --nproc_per_node=N` it trains data-parallel (helpers.run.distributed):
    --batch-size is the global batch, rank 0 alone writes the files and answers the
    validation prompts; the other ranks return {}.
    """
    from helpers.run.distributed import process_group

    with process_group(args.device):
        return _train_and_write(args)


def _resolve_defaults(args: argparse.Namespace, name: str) -> None:
    """Options left out take the model's run defaults; chapter-faithful mode, the flag or
    $COURSE_CHAPTER_COMPAT (as helpers.finetune reads it)."""
    for key, value in asdict(dpo_run_defaults(name)).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.chapter_compat is None:
        args.chapter_compat = chapter_compat_from_env()


def _space_needed(out: Path, policy: GPTModel) -> int:
    """Free bytes a run needs in `out`: a checkpoint (an existing one's space is reused), then
    the model file."""
    from helpers.run.checkpoints import checkpoint_bytes, file_bytes, space_needed, weights_bytes

    return space_needed(
        checkpoint_bytes(policy),
        model_file=weights_bytes(policy),
        existing=file_bytes(out / "checkpoints"),
    )


def _ranks_agree(args: argparse.Namespace) -> bool:
    """Under torchrun: the batch splits between the processes, whose flags agree; rank 0?"""
    from helpers.run.distributed import check_batch_size, check_same, current

    check_batch_size(args.batch_size)  # the global batch, split by rows
    check_same("flags", {k: v for k, v in vars(args).items() if k not in _LOCAL_FLAGS})
    return current().main


def _train_and_write(args: argparse.Namespace) -> dict[str, Any]:
    """`run`'s work on one rank: the model, the pairs, DPO training; rank 0 writes."""
    from helpers.dpo.loss import freeze_reference
    from helpers.dpo.outputs import final_metrics, write_history, write_summary
    from helpers.dpo.train import train_dpo  # looked up now: tests replace it
    from helpers.run.checkpoints import checkpoint_path
    from helpers.run.distributed import local_device
    from helpers.runtime import check_output_dir
    from helpers.weights import load_model

    start = time.perf_counter()
    name, sft = resolve_model(args)
    _resolve_defaults(args, name)
    main = _ranks_agree(args)  # only rank 0 of a distributed run writes
    out = Path(args.output_dir) if args.output_dir else dpo_run_dir(name)
    if args.resume and not checkpoint_path(out / "checkpoints").is_file():
        raise UsageError(f"--resume: no DPO checkpoint in {out / 'checkpoints'}")
    if main:
        check_output_dir(out)  # writable? (before any work)
    splits = _splits(args)
    device = local_device(get_device(args.device))  # under torchrun: GPU LOCAL_RANK
    policy = load_model(sft, device=device).set_dropout(0.0)  # as the book's DPO: no dropout
    reference = freeze_reference(policy)
    if main:  # fail now, not after training: OutputDirError
        check_output_dir(out, _space_needed(out, policy))
    label = describe_model(name, f"instruction-tuned {sft.name}, then DPO")
    print(f"Model: {label} on {device}")
    print(f"Pairs: {len(splits.train)} train, {len(splits.validation)} validation")
    loaders = _loaders(args, splits, policy, device)
    config, options = _settings(args, out / "checkpoints")
    history = train_dpo(
        policy,
        reference,
        loaders.train,
        loaders.validation,
        config=config,
        options=options,
        device=device,
        resume_from=options.checkpoint_dir if args.resume else None,
        chapter_compat=args.chapter_compat,
    )
    if not main:
        return {}  # rank 0 writes the files (and the others wait for it)
    meta = {"model": name, "description": label, "sft_checkpoint": str(sft), "beta": args.beta}
    meta.update(max_new_tokens=args.max_new_tokens, decoding="greedy")
    files = write_history(history, out, title=label)
    entries = splits.validation[: args.response_limit]
    files += _write_outputs(args, out, (reference, policy), entries, meta)
    summary = {
        "model": label,
        "device": str(device),
        "entries": {"train": len(splits.train), "validation": len(splits.validation)},
        "steps": int(history.attrs["steps"]),
        "final": final_metrics(history),
        "total_minutes": round((time.perf_counter() - start) / 60, 3),
        "settings": {k: v for k, v in vars(args).items() if k != "quiet"},
        "files": sorted(p.name for p in files),
    }
    write_summary(summary, out)
    return summary


def main(argv: list[str] | None = None) -> int:
    """Entry point: 0 on success, 2 with one `error:` line for expected problems, 128 + the
    signal's number after Ctrl-C (130), SIGTERM (143) or SIGHUP (129)."""
    from helpers.data import DatasetError, DownloadError
    from helpers.run.checkpoints import CheckpointError
    from helpers.run.distributed import DistributedError, launched
    from helpers.run.train_extensions import interrupted_report
    from helpers.runtime import OutputDirError
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
        CheckpointError,
        CheckpointMismatchError,
        OutputDirError,
        FloatingPointError,
        OSError,  # e.g. a full disk while writing the results: names the file
        DistributedError,
    ) as exc:
        message = " ".join(str(exc).split())
        print(f"error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:  # Ctrl-C, SIGTERM, SIGHUP: saved, if there was a step
        message, code = interrupted_report(exc)
        if launched().main:  # under torchrun rank 0 says it (and it alone saves)
            print(f"\n{message}", file=sys.stderr)
        return code
    return 0
