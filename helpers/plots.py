"""Figures: the chapter's loss curves (epochs below, tokens seen above), marked and live-updating,
and the bar chart that compares runs' response quality (`helpers.review.metrics.compare_runs`).
"""

from __future__ import annotations

import io
import os
import textwrap
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import pandas as pd
from matplotlib.figure import Figure

from helpers.atomic import atomic_path


def _frame(history: Any) -> pd.DataFrame:
    df = pd.DataFrame(history)
    missing = {"epoch", "tokens_seen", "train_loss", "val_loss"} - set(df.columns)
    if missing:
        raise ValueError(f"loss history lacks column(s): {', '.join(sorted(missing))}")
    return df.reset_index(drop=True)


def overfitting_onset(history: Any, tolerance: float = 0.0) -> int | None:
    """Row where validation loss bottoms out while training loss keeps falling afterwards.

    Returns the index of the best validation loss if the last validation loss is above it
    by more than `tolerance` (relative) and training loss went on falling; else None.
    """
    df = _frame(history)
    if len(df) < 3 or df["val_loss"].isna().all():
        return None
    best = int(df["val_loss"].idxmin())
    last = len(df) - 1
    if best == last:
        return None
    rising = df["val_loss"].iloc[-1] > df["val_loss"].iloc[best] * (1.0 + tolerance)
    still_learning = df["train_loss"].iloc[-1] < df["train_loss"].iloc[best]
    return best if rising and still_learning else None


def plot_losses(
    history: Any,
    *,
    title: str | None = None,
    mark: bool = True,
    figsize: tuple[float, float] = (6, 3.5),
) -> Figure:
    """Training and validation loss vs epochs (tokens seen on the top axis), best point marked."""
    df = _frame(history)
    fig, ax1 = plt.subplots(figsize=figsize)
    ax1.plot(df["epoch"], df["train_loss"], label="Training loss")
    ax1.plot(df["epoch"], df["val_loss"], linestyle="-.", label="Validation loss")
    ax1.set_xlabel("Epochs")
    ax1.set_ylabel("Loss")
    if mark and df["val_loss"].notna().any():
        best = int(df["val_loss"].idxmin())
        ax1.scatter(
            [df["epoch"][best]],
            [df["val_loss"][best]],
            color="black",
            zorder=3,
            label=f"Best validation loss ({df['val_loss'][best]:.3f})",
        )
        onset = overfitting_onset(df)
        if onset is not None:
            # Past this point the model memorises the training set instead of generalising.
            ax1.axvspan(
                df["epoch"][onset],
                df["epoch"].iloc[-1],
                color="tab:red",
                alpha=0.1,
                label="Overfitting (validation loss rising)",
            )
    ax1.legend(loc="best", fontsize=8)
    # A second x-axis with the same curves drawn invisibly, as the chapter does, so its ticks
    # show the tokens seen at each point.
    ax2 = ax1.twiny()
    ax2.plot(df["tokens_seen"], df["train_loss"], alpha=0)
    ax2.set_xlabel("Tokens seen")
    e, t = df["epoch"], df["tokens_seen"]
    if len(df) > 1 and e.iloc[-1] != e.iloc[0]:
        # Line the top axis up with the bottom one (tokens grow ~linearly with epochs).
        rate = (t.iloc[-1] - t.iloc[0]) / (e.iloc[-1] - e.iloc[0])
        x0, x1 = ax1.get_xlim()
        ax2.set_xlim(t.iloc[0] + rate * (x0 - e.iloc[0]), t.iloc[0] + rate * (x1 - e.iloc[0]))
    if title:
        ax1.set_title(title, fontsize=9)
    fig.tight_layout()
    return fig


def save_loss_plot(fig: Figure, path_stem: str | os.PathLike[str]) -> list[Path]:
    """Save `fig` as `<stem>.png` and `<stem>.pdf`, each written atomically."""
    stem = Path(path_stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    written = []
    for fmt in ("png", "pdf"):
        final = stem.with_name(f"{stem.name}.{fmt}")
        with atomic_path(final) as tmp:
            fig.savefig(tmp, format=fmt, dpi=150, bbox_inches="tight")
        written.append(final)
    return written


def _in_notebook() -> bool:
    try:
        from IPython import get_ipython
    except ImportError:
        return False
    shell = get_ipython()
    return shell is not None and "IPKernelApp" in getattr(shell, "config", {})


class LiveLossPlot:
    """A loss plot that redraws in place in a notebook; pass `.update` as train's callback.

    Outside a notebook it only remembers the latest history (no windows, no output), so the
    same code runs in scripts and tests.
    """

    def __init__(self, title: str | None = None, *, enabled: bool | None = None) -> None:
        self.title = title
        self.enabled = _in_notebook() if enabled is None else enabled
        self.history: pd.DataFrame | None = None
        self._handle: Any = None

    def update(self, history: Any) -> None:
        """Redraw with the history so far (a DataFrame or list of rows)."""
        self.history = _frame(history)
        if not self.enabled or self.history.empty:
            return
        from IPython.display import Image, display

        fig = plot_losses(self.history, title=self.title)
        # A PNG rather than the Figure: it shows whatever matplotlib backend is active.
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
        plt.close(fig)  # the display holds the image; closing avoids a duplicate at cell end
        image = Image(data=buffer.getvalue(), format="png")
        if self._handle is None:
            self._handle = display(image, display_id=True)
        else:
            self._handle.update(image)

    __call__ = update

    def figure(self) -> Figure:
        """The final plot as a Figure (e.g. to save it)."""
        if self.history is None:
            raise ValueError("LiveLossPlot has no history yet; call update() first")
        return plot_losses(self.history, title=self.title)


def plot_comparison(comparison: pd.DataFrame, *, title: str = "Response quality by run") -> Figure:
    """Grouped bar chart of `compare_runs` output (metrics on a 0-1 scale); returns the Figure."""
    cols = [c for c in comparison.columns if c != "n"]
    fig, ax = plt.subplots(figsize=(3.0 + 2.2 * len(comparison), 3.5))
    comparison[cols].plot.bar(ax=ax, rot=0)
    # Run names are often long ("gpt2-medium, fine-tuned, phi3 prompt"): wrap the labels.
    ax.set_xticks(ax.get_xticks(), [textwrap.fill(str(n), 18) for n in comparison.index])
    ax.set_ylim(0, 1)
    ax.set_ylabel("score (0-1)")
    ax.set_xlabel("")
    ax.set_title(title)
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize="small")
    fig.tight_layout()
    return fig
