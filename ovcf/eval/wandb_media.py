"""W&B media of a classification test: ROC curve, confusion matrix, per-case table (pseudonyms
only), metric table and Grad-CAM overlays. Used by the training run's test epoch and by
`python -m ovcf.evaluate`; offline runs show them after `wandb sync`."""

from __future__ import annotations

from pathlib import Path

import numpy as np

CLASSES = ["chronic", "acute"]


def case_media(prefix: str, ids: list[str], labels, probs, threshold: float) -> dict:
    """ROC, confusion matrix at `threshold` and the per-case table, keyed under `prefix`."""
    import wandb

    y = np.asarray(labels, dtype=int)
    p = np.asarray(probs, dtype=float)
    calls = (p >= threshold).astype(int)
    media = {
        f"{prefix}/cases": wandb.Table(
            columns=["case", "label", "probability", "call"],
            data=[[i, CLASSES[a], float(b), CLASSES[c]] for i, a, b, c in zip(ids, y, p, calls)],
        ),
        f"{prefix}/confusion": wandb.plot.confusion_matrix(
            y_true=y.tolist(), preds=calls.tolist(), class_names=CLASSES, title=f"{prefix}: threshold {threshold:.3f}"
        ),
    }
    if 0 < y.sum() < len(y):  # a curve needs both classes
        media[f"{prefix}/roc"] = wandb.plot.roc_curve(y, np.stack([1 - p, p], 1), labels=CLASSES, classes_to_plot=[1])
    return media


def metric_table(models: dict, key: str = "test", prefix: str = "external") -> dict:
    """One row per model: AUC with CI and the rates with CIs of its `key` metrics (the external test;
    "val" for a one-center run), logged as `<prefix>/metrics`."""
    import wandb

    names = ("auc", "sensitivity", "specificity", "accuracy", "ppv", "npv")
    columns = ["model", "n", "threshold"] + [f"{n}{s}" for n in names for s in ("", "_low", "_high")]
    rows = []
    for label, m in models.items():
        t = m[key]
        rows.append([label, t["n"], t["threshold"]] + [t[n][k] for n in names for k in ("value", "low", "high")])
    return {f"{prefix}/metrics": wandb.Table(columns=columns, data=rows)}


def images(prefix: str, paths: list[Path]) -> dict:
    """PNG figures (Grad-CAM galleries, ROC, calibration) as W&B images."""
    import wandb

    return {f"{prefix}/{Path(p).stem}": wandb.Image(str(p)) for p in paths if Path(p).is_file()}
