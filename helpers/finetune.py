"""The whole chapter headless: `python -m helpers.finetune --model gpt2-medium` (or `tiny`).

`run(settings)` does it in four steps: `load` (dataset, splits, loaders), `build` (model,
LoRA adapters with --lora-rank, initial losses, a check that the output folder can take the
files), `fit` (training, with checkpoints) and `write` (LoRA adapters, model, history, loss
plot, test-split responses, summary.json), all into one output folder. A LoRA run saves its
adapters, then merges them and saves the merged model like any run, so every tool that loads
`<model>-sft.safetensors` works unchanged. `--chapter-compat` is chapter-faithful mode end to
end (untied head, the chapter's shuffling and test prompts). `main` is the command line
(options in helpers.run.cli): expected errors print one line and exit with code 2.
Under `torchrun --nproc_per_node=N` it trains data-parallel (helpers.run.distributed): the
ranks split every batch and the test answers, and rank 0 alone writes the files.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any, NamedTuple

import pandas as pd
import torch

from helpers.atomic import atomic_path, atomic_write_text
from helpers.batching import Loaders, make_loaders
from helpers.config import is_pretrained_preset
from helpers.data import DatasetError, DataSplits, DownloadError, load_instruction_data, split_data
from helpers.generate import GenerationSettings, generate_responses, generate_test_responses
from helpers.lora.adapters import save_lora_adapters
from helpers.lora.layers import (
    count_parameters,
    lora_settings,
    merge_lora,
    parameter_report,
)
from helpers.model import GPTModel
from helpers.review.metrics import CONSTANT_ANSWER, answer_report
from helpers.run.checkpoints import (
    CheckpointError,
    DiskFullError,
    checkpoint_bytes,
    checkpoint_path,
    file_bytes,
    is_disk_full,
    space_needed,
    weights_bytes,
)
from helpers.run.cli import FinetuneSettings, build_parser, settings_from_args
from helpers.run.distributed import (
    DistributedError,
    check_batch_size,
    check_same,
    current,
    gather_parts,
    launched,
    local_device,
    process_group,
)
from helpers.run.epoch_sample import sample_printer
from helpers.run.train_config import RunOptions
from helpers.run.train_extensions import interrupted_report
from helpers.runtime import (
    OutputDirError,
    check_output_dir,
    describe_model,
    finetuned_path,
    get_device,
)
from helpers.train import calc_loss_loader, train
from helpers.weights import (
    CheckpointFileError,
    CheckpointMismatchError,
    load_pretrained,
    random_model,
    save_model,
)

RESPONSES_NAME = "instruction-data-with-response.json"  # the chapter's file name
HISTORY_NAME = "history.csv"
ADAPTERS_NAME = "lora-adapters.safetensors"  # a LoRA run's adapters (the model file is merged)


class RunError(ValueError):
    """An expected problem with the run's inputs (too little data, a missing checkpoint...)."""


# What the command line reports as one line (exit code 2) instead of a traceback.
EXPECTED_ERRORS = (
    RunError,
    DatasetError,
    DownloadError,
    CheckpointError,
    CheckpointFileError,
    CheckpointMismatchError,
    FloatingPointError,
    OutputDirError,
    OSError,
    DistributedError,
)


class Loaded(NamedTuple):
    """The `load` step's result."""

    splits: DataSplits
    loaders: Loaders
    test_entries: list[dict[str, Any]]


class Built(NamedTuple):
    """The `build` step's result."""

    model: GPTModel
    weights: str  # which weights it started from
    label: str  # describe_model's line
    device: torch.device
    initial_loss: dict[str, float]
    parameters: tuple[int, int]  # (trainable, total), LoRA's A/B included


def load(settings: FinetuneSettings) -> Loaded:
    """Dataset (optionally its first `limit` entries), the 85/5/10 split and the loaders."""
    data = load_instruction_data(settings.data)[: settings.limit]
    splits = split_data(data)
    if len(splits.train) < settings.batch_size or not splits.validation or not splits.test:
        raise RunError(
            f"{len(data)} entries split into {len(splits.train)} train / {len(splits.validation)} "
            f"validation / {len(splits.test)} test; need at least --batch-size "
            f"({settings.batch_size}) train entries and one of each other split (raise --limit)"
        )
    if settings.chapter_compat:  # the chapter's loaders shuffle from the global RNG, seeded so
        torch.manual_seed(settings.train.seed)
    loaders = make_loaders(
        splits,
        batch_size=settings.batch_size,
        style=settings.style,
        mask_prompt=settings.mask_prompt,
        allowed_max_length=settings.max_length,
        grouped=settings.grouped,
        seed=settings.train.seed,
        chapter_compat=settings.chapter_compat,
    )
    print(
        f"Data: {len(splits.train)} train, {len(splits.validation)} validation, "
        f"{len(splits.test)} test entries"
    )
    test = splits.test[: settings.test_limit] if settings.test_limit else splits.test
    return Loaded(splits, loaders, list(test))


def build(settings: FinetuneSettings, loaded: Loaded) -> Built:
    """The model (OpenAI weights, or a random init seeded by the run's seed) and its losses."""
    if settings.resume and not checkpoint_path(settings.checkpoint_dir).is_file():
        raise RunError(f"--resume: no checkpoint in {settings.checkpoint_dir}")
    main = current().main  # only rank 0 of a distributed run writes
    if main:  # writable? (before a possibly long weights download)
        check_output_dir(settings.output_dir)
    tie = not settings.chapter_compat  # the chapter's GPTModel has a separate out_head
    if not settings.random_init and is_pretrained_preset(settings.model):
        model, weights = load_pretrained(settings.model, tie_embeddings=tie), "OpenAI GPT-2 weights"
    else:
        model = random_model(settings.model, seed=settings.train.seed, tie_embeddings=tie)
        weights = "random init"
    if settings.drop_rate is not None:
        model.set_dropout(settings.drop_rate)
    _add_lora(settings, model)  # before the losses and training (a checkpoint has its keys)
    if settings.max_length > model.cfg.context_length:
        raise RunError(
            f"--max-length {settings.max_length} exceeds the model's context length "
            f"{model.cfg.context_length}"
        )
    # Fail now, not after hours of training: the folder must take the model and a checkpoint.
    if main:
        check_output_dir(settings.output_dir, _space_needed(settings, model))
    device = local_device(get_device(settings.device))  # under torchrun: GPU LOCAL_RANK
    model.to(device)
    label = describe_model(settings.model, weights)
    print(f"Model: {label} on {device}")
    if settings.lora is not None:
        print(parameter_report(model))
    model.eval()
    initial = {
        split: calc_loss_loader(
            getattr(loaded.loaders, split), model, device, num_batches=settings.train.eval_iter
        )
        for split in ("train", "validation")
    }
    print(f"Initial loss: train {initial['train']:.3f}, validation {initial['validation']:.3f}")
    return Built(model, weights, label, device, initial, count_parameters(model))


def _space_needed(settings: FinetuneSettings, model: GPTModel) -> int:
    """Free bytes the run needs: its checkpoint (reusing an old one's space), then the model."""
    if not settings.checkpoint:
        return weights_bytes(model)
    early = settings.train.early_stopping_patience is not None
    return space_needed(
        checkpoint_bytes(model, early_stopping=early),
        model_file=weights_bytes(model),
        existing=file_bytes(settings.checkpoint_dir),
    )


@contextlib.contextmanager
def _disk_full_guard(settings: FinetuneSettings, model: GPTModel) -> Iterator[None]:
    """A full disk while writing the results: one DiskFullError that says what to free.

    The trained run is safe in its checkpoint, so `--resume` writes the files once there
    is room (it needs what `_space_needed` checks before training).
    """
    try:
        yield
    except OSError as exc:
        if not is_disk_full(exc):
            raise
        out = settings.output_dir
        needed, free = _space_needed(settings, model), shutil.disk_usage(out).free
        free_more = f"free at least {max(needed - free, 0) / 2**20:.0f} MiB there"
        if settings.checkpoint and checkpoint_path(settings.checkpoint_dir).is_file():
            kept = settings.checkpoint_dir
            advice = f"the trained run is in {kept}: {free_more} and rerun with --resume"
        else:
            why = "" if settings.checkpoint else " (--no-checkpoint)"
            advice = f"no checkpoint holds the run{why}: {free_more} and rerun"
        where = f"{exc.strerror or exc}" + (f": {exc.filename}" if exc.filename else "")
        raise DiskFullError(
            f"disk full: cannot write the results into {out} ({where}); {advice}",
            folder=Path(out),
            free=free,
            needed=needed,
        ) from exc


def _add_lora(settings: FinetuneSettings, model: GPTModel) -> None:
    """With --lora-rank: freeze `model` and add seeded LoRA adapters (in place)."""
    if settings.lora is None:
        return
    with torch.random.fork_rng(devices=[]):  # the same A matrices on every run
        torch.manual_seed(settings.train.seed)
        settings.lora.apply(model)


def generation_settings(settings: FinetuneSettings, max_new_tokens: int) -> GenerationSettings:
    """How the run generates answers: `max_new_tokens` each, in its prompt style and mode."""
    return GenerationSettings(
        max_new_tokens=max_new_tokens,
        no_repeat_ngram=settings.no_repeat_ngram or None,
        style=settings.style,
        chapter_compat=settings.chapter_compat,
        batch_size=settings.batch_size,
    )


def fit(settings: FinetuneSettings, loaded: Loaded, built: Built) -> pd.DataFrame:
    """Train with checkpoints in output_dir/checkpoints; the history's attrs say how long."""
    options = RunOptions(
        checkpoint_dir=settings.checkpoint_dir if settings.checkpoint else None,
        checkpoint_every=settings.checkpoint_every,
        checkpoint_minutes=settings.checkpoint_minutes,
        progress=settings.progress,
        eval_batched=settings.eval_batched,
        deterministic=settings.deterministic,
    )
    start = time.perf_counter()
    history = train(
        built.model,
        loaded.loaders.train,
        loaded.loaders.validation,
        config=settings.train,
        options=options,
        device=built.device,
        resume_from=settings.checkpoint_dir if settings.resume else None,
        on_epoch_end=sample_printer(
            loaded.splits.validation[0],
            generation_settings(settings, settings.sample_max_new_tokens),
        ),
    )
    history.attrs["training_minutes"] = (time.perf_counter() - start) / 60
    print(f"Training completed in {history.attrs['training_minutes']:.2f} minutes.")
    return history


def write(
    settings: FinetuneSettings, loaded: Loaded, built: Built, history: pd.DataFrame, started: float
) -> dict[str, Any]:
    """Model first (the most precious file), then history, plot, responses and summary.json.

    A LoRA run first writes its adapters (small), then merges them into the model (in place)
    and saves the merged model as every run does.
    """
    from helpers.plots import plot_losses, save_loss_plot

    out = settings.output_dir
    model_file = out / finetuned_path(settings.model).name
    meta = {
        "base_model": settings.model,
        "weights": f"{built.weights}, fine-tuned",
        "prompt_style": settings.style,
        "mask_prompt": settings.mask_prompt,
        "chapter_compat": settings.chapter_compat,
    }
    lora = _write_adapters(settings, built, out / ADAPTERS_NAME, meta)
    if lora:
        meta |= {"weights": f"{built.weights}, LoRA fine-tuned (merged)", "lora": lora}
    save_model(built.model, model_file, metadata=meta)
    with atomic_path(out / HISTORY_NAME) as tmp:
        history.to_csv(tmp, index=False)
    plot_files = save_loss_plot(plot_losses(history, title=built.label), out / "loss-plot")
    responses = generate_test_responses(
        built.model,
        loaded.test_entries,
        out / RESPONSES_NAME,
        generation_settings(settings, settings.max_new_tokens),
        model_name=settings.model,
        checkpoint=model_file.name,
        extra_metadata={
            "weights": meta["weights"],
            "description": built.label,
            "mask_prompt": settings.mask_prompt,
        },
        answers=answer_test_entries(settings, loaded, built),
    )
    files = [*plot_files, out / RESPONSES_NAME, model_file, out / HISTORY_NAME]
    files += [out / lora["adapters"]] if lora else []
    names = sorted(p.name for p in files)
    summary = summarize(settings, loaded, built, history, names, lora, answers=responses.entries)
    summary["total_minutes"] = round((time.perf_counter() - started) / 60, 3)
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=2) + "\n")
    return summary


def answer_test_entries(settings: FinetuneSettings, loaded: Loaded, built: Built) -> list[str]:
    """The test entries' answers; under torchrun each rank generates its share of the batches."""
    gen = generation_settings(settings, settings.max_new_tokens)
    built.model.eval()
    return gather_parts(
        lambda part: generate_responses(
            built.model, loaded.test_entries, gen, progress=settings.progress, part=part
        )
    )


def help_write(settings: FinetuneSettings, loaded: Loaded, built: Built) -> None:
    """A distributed run's ranks other than 0: the LoRA merge and their share of the answers."""
    if lora_settings(built.model) is not None:
        merge_lora(built.model)  # as rank 0 does: the answers come from the merged model
    answer_test_entries(settings, loaded, built)


def _write_adapters(
    settings: FinetuneSettings, built: Built, path: Path, meta: dict[str, Any]
) -> dict[str, Any] | None:
    """A LoRA run's adapters into `path`, then merged into the model; their settings (or None)."""
    lora = lora_settings(built.model)
    if lora is None:
        return None
    extra = {k: meta[k] for k in ("base_model", "prompt_style", "mask_prompt", "chapter_compat")}
    extra["base_weights"] = built.weights
    if built.weights == "random init":  # the base these adapters fit: the same seeded init
        extra["base_seed"] = settings.train.seed
    save_lora_adapters(built.model, path, metadata=extra)
    merge_lora(built.model)  # a plain GPTModel again: save_model, review and serve load it
    return {**asdict(lora), "adapters": path.name}


# --- summary.json: what the run did, and its printed summary ---


def summarize(
    settings: FinetuneSettings,
    loaded: Loaded,
    built: Built,
    history: pd.DataFrame,
    files: list[str],
    lora: dict[str, Any] | None = None,
    *,
    answers: Sequence[Mapping[str, Any]] = (),
) -> dict[str, Any]:
    """summary.json's content (without total_minutes, which the caller adds last).

    `lora`: the LoRA settings and adapter file name of a LoRA run (None: full fine-tuning).
    `answers`: the test entries with their answers, scored against the baselines
    (helpers.review.metrics.answer_report).
    """
    has = bool(len(history))
    best = history["val_loss"].idxmin() if has and history["val_loss"].notna().any() else None
    last = history.iloc[-1] if has else None
    run_settings = {k: v for k, v in asdict(settings).items() if k not in ("train", "progress")}
    trainable, total = built.parameters
    return {
        "model": built.label,
        "device": str(built.device),
        "chapter_compat": settings.chapter_compat,
        "parameters": {"trainable": trainable, "total": total},
        "lora": lora,
        "entries": {
            "train": len(loaded.splits.train),
            "validation": len(loaded.splits.validation),
            "test": len(loaded.test_entries),
        },
        "initial_loss": built.initial_loss,
        "final_loss": {"train": float(last["train_loss"]), "validation": float(last["val_loss"])}
        if last is not None
        else None,
        "best_validation": {
            "step": int(history["step"][best]),
            "loss": float(history["val_loss"][best]),
        }
        if best is not None
        else None,
        "stopped_early": history.attrs.get("stopped_early", False),
        "steps": int(last["step"]) + 1 if last is not None else 0,
        "training_minutes": round(history.attrs.get("training_minutes", 0.0), 3),
        "checkpoint_error": history.attrs.get("checkpoint_error"),
        "answers": answer_report(answers) if answers else None,
        # Run options and hyper-parameters in one flat table (output_dir as text).
        "settings": json.loads(json.dumps({**run_settings, **asdict(settings.train)}, default=str)),
        "files": files,
    }


def print_summary(summary: dict[str, Any], out: Path) -> None:
    """The summary's human-readable lines, printed at the end of the run."""
    print("\n=== Fine-tuning summary ===")
    print(f"Model:          {summary['model']}")
    trainable, total = summary["parameters"]["trainable"], summary["parameters"]["total"]
    lora = summary.get("lora")
    kind = f"LoRA rank {lora['rank']}, alpha {lora['alpha']:g}" if lora else "full fine-tuning"
    print(f"Trained:        {trainable:,} of {total:,} parameters ({kind})")
    init, final = summary["initial_loss"], summary["final_loss"]
    if final:
        print(f"Train loss:     {init['train']:.3f} -> {final['train']:.3f}")
        print(f"Val loss:       {init['validation']:.3f} -> {final['validation']:.3f}")
    if summary["best_validation"]:
        b = summary["best_validation"]
        stopped = " (stopped early)" if summary["stopped_early"] else ""
        print(f"Best val loss:  {b['loss']:.3f} at step {b['step']}{stopped}")
    print(
        f"Training time:  {summary['training_minutes']:.2f} min "
        f"(total {summary['total_minutes']:.2f} min)"
    )
    if summary.get("answers"):
        _print_answers(summary["answers"], summary["settings"].get("no_repeat_ngram", 0))
    print(f"Output folder:  {out}")
    for name in summary["files"]:
        print(f"  - {name}")


def _print_answers(report: dict[str, Any], no_repeat_ngram: int) -> None:
    """The test answers' ROUGE-L and repetition share next to the baselines and the book's."""
    base, book = report["baselines_rougeL"], report["book_gpt2_medium"]
    decoding = (
        f"greedy, no repeated {no_repeat_ngram}-token sequence" if no_repeat_ngram else "greedy"
    )
    print(
        f"Test answers:   {report['n']} ({decoding}): ROUGE-L {report['rougeL']:.3f}, "
        f"{report['repetition']:.0%} repeat a 3-word sequence, {report['empty']} empty"
    )
    print(
        f"  baselines:    ROUGE-L {base['constant answer']:.3f} answering {CONSTANT_ANSWER!r} "
        f"to everything, {base['copy the input']:.3f} copying the input"
    )
    print(
        f"  the book:     ROUGE-L {book['rougeL']:.3f}, {book['repetition']:.0%} repeating "
        "(its GPT-2 medium on the chapter's 110 test entries)"
    )


def _flags(settings: FinetuneSettings) -> dict[str, Any]:
    # What every rank of a distributed run must agree on (paths may differ between nodes).
    local = ("data", "output_dir", "device", "progress")
    return {k: v for k, v in asdict(settings).items() if k not in local}


def run(settings: FinetuneSettings) -> dict[str, Any]:
    """The chapter's run: load, build, fit, write; returns the summary it also writes.

    Under torchrun every rank loads, builds and trains; rank 0 writes while the others
    generate their share of the test answers, then wait for it (they return {}).
    """
    start = time.perf_counter()
    check_batch_size(settings.batch_size)
    with process_group(settings.device) as ranks:
        check_same("flags", _flags(settings))
        loaded = load(settings)
        built = build(settings, loaded)
        history = fit(settings, loaded, built)
        if not ranks.main:
            help_write(settings, loaded, built)
            return {}
        with _disk_full_guard(settings, built.model):
            summary = write(settings, loaded, built, history, started=start)
    print_summary(summary, settings.output_dir)
    return summary


def _interrupted(exc: KeyboardInterrupt) -> int:
    message, code = interrupted_report(exc)
    if launched().main:  # under torchrun rank 0 says it (and it alone saves)
        print(f"\n{message}", file=sys.stderr)
    return code


def main(argv: list[str] | None = None) -> int:
    """Entry point: options -> settings -> run. Expected errors: one line, exit code 2."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        settings = settings_from_args(args)
    except ValueError as exc:
        parser.error(f"--model: {exc}" if "model preset" in str(exc) else str(exc))
    try:
        summary = run(settings)
    except KeyboardInterrupt as exc:
        return _interrupted(exc)
    except EXPECTED_ERRORS as exc:
        if args.debug:
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if summary.get("checkpoint_error"):
        print(
            f"error: {summary['checkpoint_error']} (the model and results were written)",
            file=sys.stderr,
        )
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
