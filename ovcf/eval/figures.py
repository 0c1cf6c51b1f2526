"""Publication figures of an evaluation: ROC curves, confusion matrices, calibration (PNG, 300 dpi)."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

DPI = 300


def slug(label: str) -> str:
    """A file-name-safe form of a model label (figures and galleries are named after models)."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", label).strip("_")


def pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only; no display on servers
    import matplotlib.pyplot as plt

    plt.rcParams.update({"font.size": 9, "axes.titlesize": 10, "legend.fontsize": 7.5, "figure.dpi": 100})
    return plt


def roc_figure(models: list[dict], path: Path, title: str = "External test") -> Path:
    """All models' ROC curves on one plot; the legend holds AUC and its 95% CI, and each model's
    frozen operating point is marked. `models`: {label, labels, scores, auc: {value, low, high}, point}."""
    from sklearn.metrics import roc_curve

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(4.2, 4.2))
    for m in models:
        fpr, tpr, _ = roc_curve(m["labels"], m["scores"])
        a = m["auc"]
        line = ax.plot(fpr, tpr, lw=1.4, label=f"{m['label']}: AUC {a['value']:.3f} ({a['low']:.3f}-{a['high']:.3f})")[0]
        if m.get("point") is not None:
            ax.plot(*m["point"], "o", ms=4, color=line.get_color())
    ax.plot([0, 1], [0, 1], ls="--", lw=0.8, color="0.6")
    ax.set(xlim=(0, 1), ylim=(0, 1.01), xlabel="1 - specificity", ylabel="Sensitivity", title=title, aspect="equal")
    ax.legend(loc="lower right", frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


def confusion_figure(counts: dict, path: Path, title: str) -> Path:
    """A 2x2 confusion matrix with counts and row percentages (share of each true class)."""
    plt = pyplot()
    matrix = np.array([[counts["tn"], counts["fp"]], [counts["fn"], counts["tp"]]])
    share = matrix / np.maximum(matrix.sum(1, keepdims=True), 1)
    fig, ax = plt.subplots(figsize=(3.2, 2.9))
    ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
    for i in range(2):
        for j in range(2):
            colour = "white" if share[i, j] > 0.6 else "black"
            ax.text(j, i, f"{matrix[i, j]}\n{100 * share[i, j]:.1f}%", ha="center", va="center", color=colour)
    ax.set(xticks=[0, 1], yticks=[0, 1], xlabel="Predicted", ylabel="True", title=title)
    ax.set_xticklabels(["chronic", "acute"])
    ax.set_yticklabels(["chronic", "acute"])
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


def calibration_figure(models: list[dict], path: Path, title: str = "Calibration, external test") -> Path:
    """Observed acute fraction against mean predicted probability (quantile bins), Brier score in the legend.
    `models`: {label, calibration: {predicted, observed, brier}}."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(4.2, 4.2))
    ax.plot([0, 1], [0, 1], ls="--", lw=0.8, color="0.6", label="perfect")
    for m in models:
        c = m["calibration"]
        ax.plot(c["predicted"], c["observed"], "o-", ms=3, lw=1.2, label=f"{m['label']}: Brier {c['brier']:.3f}")
    ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="Predicted probability (acute)", ylabel="Observed fraction acute")
    ax.set(title=title, aspect="equal")
    ax.legend(loc="upper left", frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path
