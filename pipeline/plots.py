"""Figures logged with the runs: learning curves, the confusion matrix, the grid chart."""

import matplotlib

matplotlib.use("Agg")  # files only; no display on servers and CI

import matplotlib.pyplot as plt  # noqa: E402
import mlflow  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402
from sklearn.metrics import ConfusionMatrixDisplay  # noqa: E402


def log_figure(fig: plt.Figure, artifact_file: str) -> None:
    """Log fig into the active run as artifact_file, then close it: pyplot keeps every open figure
    (a grid's seven points, a tune's trials) until closed, and warns past 20."""
    try:
        mlflow.log_figure(fig, artifact_file)
    finally:
        plt.close(fig)


def learning_curves(history: dict, title: str = "", phase_2: int | None = None) -> plt.Figure:
    """Loss and accuracy per epoch, train vs validation, side by side (the studies' Graph/N.png).

    phase_2: phase 2's first epoch in two-phase training; a dashed line marks where fine-tuning
    starts. Epochs count from 1, as the runs' metric steps and best_epoch do.
    """
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    epochs = range(1, len(history["loss"]) + 1)
    for ax, metric in zip(axes, ("loss", "accuracy")):
        ax.plot(epochs, history[metric], "o-", label=f"train {metric}")
        ax.plot(epochs, history[f"val_{metric}"], "o-", label=f"validation {metric}")
        if phase_2 is not None:
            ax.axvline(phase_2 - 0.5, color="grey", linestyle="--", label="fine-tuning starts")
        ax.set(xlabel="epoch", ylabel=metric, title=f"{title} {metric}".strip())
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.legend()
    fig.tight_layout()
    return fig


def confusion_matrix(cm: pd.DataFrame) -> plt.Figure:
    """Confusion matrix counts, true classes as rows."""
    fig, ax = plt.subplots(figsize=(1.2 * len(cm) + 3, 1.2 * len(cm) + 2))
    ConfusionMatrixDisplay(cm.to_numpy(), display_labels=list(cm.columns)).plot(ax=ax, colorbar=False)
    ax.tick_params(axis="x", labelrotation=45)
    fig.tight_layout()
    return fig


def grid_chart(table: pd.DataFrame, chosen: int | None = None) -> plt.Figure:
    """Test accuracy and learning time per grid point, side by side (the studies' result.png);
    the chosen point (row position `chosen`: best validation accuracy) outlined and labelled."""
    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    for ax, column, colour, fmt in zip(axes, ("Accuracy", "Learning Time(ms)"), ("tab:blue", "tab:orange"),
                                       ("%.4f", "%.0f")):
        bars = ax.bar(table["Model"], table[column], color=colour)
        ax.bar_label(bars, fmt=fmt, fontsize=8)
        if chosen is not None:
            bars[chosen].set(edgecolor="black", linewidth=2.5, hatch="//")
        ax.set(title=column, ylabel=column)
        ax.tick_params(axis="x", labelrotation=45)
    if chosen is not None:
        fig.suptitle(f"chosen on validation accuracy: {table['Model'].iloc[chosen]} (hatched)", fontsize=10)
    fig.tight_layout()
    return fig
