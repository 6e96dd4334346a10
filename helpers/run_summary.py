"""summary.json of `python -m helpers.finetune`: what the run did, and its printed summary.

`summarize` builds the dict (losses, steps, timing, parameter counts, LoRA, the chapter-faithful
switch, every run setting in one flat table, the files written); `print_summary` prints it.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd

if TYPE_CHECKING:  # helpers.finetune imports this module
    from helpers.cli import FinetuneSettings
    from helpers.finetune import Built, Loaded


def summarize(
    settings: FinetuneSettings,
    loaded: Loaded,
    built: Built,
    history: pd.DataFrame,
    files: list[str],
    lora: dict | None = None,
) -> dict[str, Any]:
    """summary.json's content (without total_minutes, which the caller adds last).

    `lora`: the LoRA settings and adapter file name of a LoRA run (None: full fine-tuning).
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
        },  # fmt: skip
        "initial_loss": built.initial_loss,
        "final_loss": {"train": float(last["train_loss"]), "validation": float(last["val_loss"])}
        if last is not None
        else None,  # fmt: skip
        "best_validation": {
            "step": int(history["step"][best]),
            "loss": float(history["val_loss"][best]),
        }
        if best is not None
        else None,  # fmt: skip
        "stopped_early": history.attrs.get("stopped_early", False),
        "steps": int(last["step"]) + 1 if last is not None else 0,
        "training_minutes": round(history.attrs.get("training_minutes", 0.0), 3),
        "checkpoint_error": history.attrs.get("checkpoint_error"),
        # Run options and hyper-parameters in one flat table (output_dir as text).
        "settings": json.loads(json.dumps({**run_settings, **asdict(settings.train)}, default=str)),
        "files": files,
    }


def print_summary(summary: dict, out: Path) -> None:
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
    print(f"Training time:  {summary['training_minutes']:.2f} min "
          f"(total {summary['total_minutes']:.2f} min)")  # fmt: skip
    print(f"Output folder:  {out}")
    for name in summary["files"]:
        print(f"  - {name}")
