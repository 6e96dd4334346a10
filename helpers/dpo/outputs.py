"""What a DPO run leaves behind: the history plot, and the files of `python -m helpers.dpo`.

`plot_dpo_history` draws the loss and reward-margin curves (notebook 07 and the command line).
The rest writes one output folder: history.csv and the plot, the validation answers of the
reference (instruction-tuned) and the DPO model side by side, the tuned model, and a
summary.json that is also printed.
"""

from __future__ import annotations

import json
import textwrap
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import pandas as pd
from matplotlib.figure import Figure

from helpers.atomic import atomic_path, atomic_write_text
from helpers.dpo.loss import BOOK_REWARDS, COURSE_REWARDS, RewardNames
from helpers.generate import GenerationSettings, generate_responses
from helpers.model import GPTModel
from helpers.plots import save_loss_plot
from helpers.runtime import REPO_ROOT, model_slug
from helpers.weights import save_model

RESPONSES_NAME = "validation-responses.json"
HISTORY_NAME = "history.csv"
SUMMARY_NAME = "summary.json"


def _rewards(columns: Any) -> RewardNames:
    """Which rewards a history (or its last row) holds: the book's log-ratio or beta x it."""
    return BOOK_REWARDS if f"train_{BOOK_REWARDS.margin}" in columns else COURSE_REWARDS


def plot_dpo_history(history: Any, *, title: str | None = None) -> Figure:
    """Two panels against the step: DPO loss, and reward margin (chosen minus rejected)."""
    df = pd.DataFrame(history)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.5))
    names = _rewards(df.columns)
    panels = ((ax1, "loss", "DPO loss", "loss"), (ax2, names.margin, names.margin_label, "margin"))
    for ax, metric, label, short in panels:
        ax.plot(df["step"], df[f"train_{metric}"], label=f"Training {short}")
        ax.plot(df["step"], df[f"val_{metric}"], linestyle="-.", label=f"Validation {short}")
        ax.set_xlabel("Step")
        ax.set_ylabel(label)
        ax.legend(loc="best", fontsize=8)
    ax2.axhline(0.0, color="grey", linewidth=0.8)
    if title:  # wrapped, so a long model description fits the figure
        fig.suptitle(textwrap.fill(title, 110), fontsize=9)
    fig.tight_layout()
    return fig


def write_history(history: pd.DataFrame, out: Path, *, title: str) -> list[Path]:
    """history.csv and the plot (`dpo-plot.*`) in `out`; returns the files written."""
    with atomic_path(out / HISTORY_NAME) as tmp:
        history.to_csv(tmp, index=False)
    plot_files = save_loss_plot(plot_dpo_history(history, title=title), out / "dpo-plot")
    return [*plot_files, out / HISTORY_NAME]


def write_responses(
    out: Path,
    reference: GPTModel,
    policy: GPTModel,
    entries: Sequence[Mapping[str, Any]],
    *,
    metadata: Mapping[str, Any],
    settings: GenerationSettings,
    progress: bool = True,
) -> Path:
    """Answer `entries` with both models (`settings`: how) into one JSON: each entry
    gains `sft_response` (the reference) and `dpo_response` (the policy)."""
    answers = zip(
        generate_responses(reference, entries, settings, progress=progress),
        generate_responses(policy, entries, settings, progress=progress),
        strict=True,
    )
    responses = [
        dict(e, sft_response=a, dpo_response=b) for e, (a, b) in zip(entries, answers, strict=True)
    ]
    return atomic_write_text(
        out / RESPONSES_NAME,
        json.dumps({"metadata": dict(metadata), "entries": responses}, indent=2) + "\n",
    )


def save_dpo_model(
    policy: GPTModel, out: Path, *, name: str, sft: Path, style: str, beta: float
) -> Path:
    """The tuned model as `<slug>-dpo.safetensors`, its metadata naming how it was made."""
    return save_model(
        policy,
        out / f"{model_slug(name)}-dpo.safetensors",
        metadata={
            "base_model": name,
            "weights": f"instruction-tuned {sft.name}, then DPO",
            "prompt_style": style,
            "dpo_beta": beta,
        },
    )


def final_metrics(history: pd.DataFrame) -> dict[str, float] | None:
    """The last evaluation's losses and rewards (None when there was none)."""
    if not len(history):
        return None
    last = history.iloc[-1]
    return {k: float(last[k]) for k in history.columns if "_" in k and k != "tokens_seen"}


def write_summary(summary: dict[str, Any], out: Path) -> Path:
    """summary.json in `out`, then the summary printed."""
    path = atomic_write_text(out / SUMMARY_NAME, json.dumps(summary, indent=2) + "\n")
    print_summary(summary, out)
    return path


def print_summary(summary: dict[str, Any], out: Path) -> None:
    """The summary for a person: model, steps, final loss and margin, time and files."""
    print("\n=== DPO summary ===")
    print(f"Model:          {summary['model']}")
    print(f"Steps:          {summary['steps']}")
    final = summary["final"]
    if final:
        print(
            f"Loss:           train {final['train_loss']:.3f}, validation {final['val_loss']:.3f}"
        )
        margin = _rewards(final).margin
        print(
            f"Reward margin:  train {final[f'train_{margin}']:.3f}, "
            f"validation {final[f'val_{margin}']:.3f} ({_rewards(final).label})"
        )
    print(f"Time:           {summary['total_minutes']:.2f} min")
    try:
        shown = out.resolve().relative_to(REPO_ROOT)
    except ValueError:
        shown = out
    print(f"Output folder:  {shown}")
    for name in summary["files"]:
        print(f"  - {name}")
