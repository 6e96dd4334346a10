"""Loss plots: the chapter's two-axis figure, markers, atomic PNG/PDF files, live plot."""

from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import pandas as pd
import pytest
from matplotlib.patches import Rectangle

from helpers.plots import (
    LiveLossPlot,
    overfitting_onset,
    plot_comparison,
    plot_losses,
    save_loss_plot,
)


def _history(val: list[float]) -> pd.DataFrame:
    n = len(val)
    return pd.DataFrame(
        {
            "step": [5 * i for i in range(n)],
            "epoch": [i / 2 for i in range(n)],
            "tokens_seen": [1000 * i for i in range(n)],
            "train_loss": [3.0 - 0.3 * i for i in range(n)],
            "val_loss": val,
            "lr": [5e-5] * n,
        }
    )


def test_overfitting_onset_is_the_best_validation_point() -> None:
    assert overfitting_onset(_history([3.0, 2.5, 2.2, 2.4, 2.7])) == 2
    assert overfitting_onset(_history([3.0, 2.5, 2.2, 2.1, 2.0])) is None  # still improving
    assert overfitting_onset(_history([3.0, 2.5, 2.2, 2.21, 2.25])) == 2
    assert overfitting_onset(_history([3.0, 2.5, 2.2, 2.21, 2.25]), tolerance=0.05) is None


def test_plot_has_both_axes_and_marks(tmp_path: Path) -> None:
    fig = plot_losses(_history([3.0, 2.5, 2.2, 2.4, 2.7]), title="tiny")
    ax1, ax2 = fig.axes
    assert ax1.get_xlabel() == "Epochs" and ax2.get_xlabel() == "Tokens seen"
    legend = ax1.get_legend()
    assert legend is not None
    labels = [t.get_text() for t in legend.get_texts()]
    assert labels[:2] == ["Training loss", "Validation loss"]
    assert "Best validation loss (2.200)" in labels
    assert "Overfitting (validation loss rising)" in labels
    paths = save_loss_plot(fig, tmp_path / "plots" / "loss")
    assert [p.name for p in paths] == ["loss.png", "loss.pdf"]
    assert paths[0].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert paths[1].read_bytes()[:5] == b"%PDF-"
    assert sorted(p.name for p in (tmp_path / "plots").iterdir()) == ["loss.pdf", "loss.png"]
    plt.close("all")


def test_plot_rejects_history_without_losses() -> None:
    with pytest.raises(ValueError, match="val_loss"):
        plot_losses(pd.DataFrame({"epoch": [0], "tokens_seen": [0], "train_loss": [1.0]}))


def test_live_plot_is_silent_outside_notebooks(capsys: pytest.CaptureFixture[str]) -> None:
    live = LiveLossPlot("run")
    assert live.enabled is False
    with pytest.raises(ValueError, match="no history"):
        live.figure()
    live.update(_history([3.0, 2.5]))
    live(_history([3.0, 2.5, 2.4]).to_dict("records"))
    assert live.history is not None and len(live.history) == 3
    assert capsys.readouterr().out == ""
    assert live.figure().axes[0].get_title() == "run"
    plt.close("all")


def test_comparison_chart_has_a_bar_per_run_and_score() -> None:
    runs = pd.DataFrame(
        {"n": [10, 10], "exact_match": [0.1, 1.0], "rougeL": [0.5, 1.0], "judge": [0.4, 1.0]},
        index=pd.Index(["gpt2-medium, fine-tuned in the chapter, alpaca prompt", "echo"]),
    )
    fig = plot_comparison(runs, title="runs")
    ax = fig.axes[0]
    assert len(ax.patches) == 2 * 3  # runs x scores; the entry count "n" is not drawn
    heights = [p.get_height() for p in ax.patches if isinstance(p, Rectangle)]
    assert sorted(round(h, 2) for h in heights) == [0.1, 0.4, 0.5, 1, 1, 1]
    assert ax.get_ylim() == (0, 1) and ax.get_title() == "runs"
    assert "\n" in ax.get_xticklabels()[0].get_text()  # long run names are wrapped
    plt.close(fig)
