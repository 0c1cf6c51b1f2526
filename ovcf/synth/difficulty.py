"""How hard a generated cohort is: a hand-crafted baseline a deep model has to beat.

The features are the ones a radiologist reads without MRI (how dense the fractured body is next to
its neighbours, how much height it lost, how much of it is condensed bone) measured on the CT and
the body mask the export holds. A logistic regression on them gives the cohort's baseline AUC: near
0.5 nothing is learnable, near 1.0 every model wins and a model comparison means nothing.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

FEATURES = ("hu_rel", "height_ratio", "dense_share")
DENSE_HU = 150.0  # a voxel is condensed bone when this much denser than the neighbours' cancellous bone
EROSION_MM = 2.5  # the shell and endplates are left out of the cancellous measurements


def _heights(body: np.ndarray, spacing: np.ndarray) -> np.ndarray:
    """Body height (mm) at its anterior, middle and posterior thirds, on the mid-sagittal strip.

    Genant grades compare these three heights with those expected from the neighbours.
    """
    columns = body.sum(axis=2) * spacing[2]  # height of every (x, y) column
    xs = np.nonzero(columns.any(axis=1))[0]
    centre, half = (xs[0] + xs[-1]) / 2, max((xs[-1] - xs[0]) / 8, 1)
    strip = columns[int(np.floor(centre - half)) : int(np.ceil(centre + half)) + 1]
    ys = np.nonzero(strip.any(axis=0))[0]
    thirds = np.array_split(np.arange(ys[0], ys[-1] + 1), 3)
    return np.array([np.median(strip[:, t][strip[:, t] > 0]) if (strip[:, t] > 0).any() else 0.0 for t in thirds])


def _body_stats(hu: np.ndarray, body: np.ndarray, spacing: np.ndarray, cut: bool) -> dict | None:
    """Cancellous HU values and heights of one body (cropped to its box); None when it is empty.

    Args:
        cut: the body touches the scan's first or last slice, so its heights are not a reference.
    """
    if not body.any():
        return None
    radius = np.maximum(np.rint(EROSION_MM / spacing).astype(int), 1)
    structure = np.ones(2 * radius + 1, bool)
    inner = ndimage.binary_erosion(body, structure=structure) if body.sum() > 50 else body
    values = hu[inner] if inner.any() else hu[body]
    return {"values": values, "heights": _heights(body, spacing), "cut": bool(cut)}


def fracture_features(hu: np.ndarray, labels: np.ndarray, spacing, fractured: dict[int, str]) -> dict[int, dict]:
    """Baseline features of each fractured body, relative to its intact neighbours.

    ``hu_rel``: median cancellous HU minus the neighbours'; ``height_ratio``: the smallest of the
    anterior, middle and posterior heights as a share of the neighbours' (Genant's reading);
    ``dense_share``: the share of cancellous voxels `DENSE_HU` denser than the neighbours' median.

    Args:
        hu: CT in HU, indexed like `labels`.
        labels: VerSe label map (one id per vertebral body).
        spacing: voxel size in mm along the three array axes: left-right, antero-posterior and
            cranio-caudal (the order the generator's grid and the cohort's ROIs use).
        fractured: label id -> anything, the bodies to describe; the others are references.

    Returns:
        label id -> {feature: value} for every fractured body the mask holds.
    """
    spacing = np.asarray(spacing, float)
    ids = [int(i) for i in np.unique(labels) if i]
    stats = {}
    boxes = ndimage.find_objects(labels.astype(np.int32))
    for lid in ids:
        box = boxes[lid - 1]
        cut = box[2].start == 0 or box[2].stop == labels.shape[2]
        s = _body_stats(hu[box], labels[box] == lid, spacing, cut)
        if s is not None:
            stats[lid] = s
    out = {}
    for lid in fractured:
        if lid not in stats:
            continue
        refs = [k for k in stats if k not in fractured and not stats[k]["cut"]]
        refs = sorted(refs, key=lambda k: abs(k - lid))[:2] or [k for k in stats if k != lid]
        if not refs:
            continue
        ref_hu = float(np.median([np.median(stats[k]["values"]) for k in refs]))
        ref_heights = np.mean([stats[k]["heights"] for k in refs], axis=0)
        values = stats[lid]["values"]
        out[lid] = {
            "hu_rel": float(np.median(values)) - ref_hu,
            "height_ratio": float(np.min(stats[lid]["heights"] / np.maximum(ref_heights, 1e-6))),
            "dense_share": float(np.mean(values > ref_hu + DENSE_HU)),
        }
    return out


def baseline_auc(rows: list[dict], seed: int = 0) -> dict:
    """Out-of-fold AUC of a logistic regression on `FEATURES`, patients kept within one fold.

    Args:
        rows: one dict per fracture with the features, ``label`` ("acute"/"chronic"),
            ``patient_id`` and ``center``.

    Returns:
        ``cv_auc`` (5-fold, all centers pooled), ``external_auc`` (fit on the first center,
        scored on the others) and the counts they rest on.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.model_selection import StratifiedGroupKFold
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    x = np.array([[r[f] for f in FEATURES] for r in rows], float)
    y = np.array([r["label"] == "acute" for r in rows], int)
    groups = np.array([r["patient_id"] for r in rows])
    centers = np.array([r["center"] for r in rows])
    result = {"fractures": len(rows), "acute": int(y.sum()), "cv_auc": None, "external_auc": None}
    if len(set(y)) < 2:
        return result

    def model():
        return make_pipeline(StandardScaler(), LogisticRegression())

    folds = min(5, *(len(set(groups[y == k])) for k in (0, 1)))  # every fold needs patients of both labels
    if folds >= 2:
        scores = np.zeros(len(y))
        for train, test in StratifiedGroupKFold(folds, shuffle=True, random_state=seed).split(x, y, groups):
            scores[test] = model().fit(x[train], y[train]).predict_proba(x[test])[:, 1]
        result["cv_auc"] = float(roc_auc_score(y, scores))
    first = centers == sorted(set(centers))[0]
    if len(set(y[first])) == 2 and len(set(y[~first])) == 2:
        fitted = model().fit(x[first], y[first])
        result["external_auc"] = float(roc_auc_score(y[~first], fitted.predict_proba(x[~first])[:, 1]))
    return result
