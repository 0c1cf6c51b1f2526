"""Every metric of the project, on arrays, independent of any model.

- Diagnostic accuracy as a paper reports it: AUC with a DeLong CI, the paired DeLong test,
  sensitivity, specificity, accuracy, PPV and NPV at a frozen threshold with Wilson or
  patient-cluster bootstrap CIs, calibration, and the Buderer sample size (numpy/scipy, tested
  against scikit-learn and published examples).
- The scores a training run logs: `binary_metrics` (torchmetrics, per epoch) for classifiers; the
  Dice family for label maps (`label_confusion`, `level_scores`, `dice`, `label_dice`, `matched_dice`).

Acute is the positive class; a vertebra is called acute when its probability is >= the threshold.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy import stats
from torchmetrics import MetricCollection
from torchmetrics.classification import BinaryAccuracy, BinaryAUROC, BinaryRecall, BinarySpecificity

RATES = ("sensitivity", "specificity", "accuracy", "ppv", "npv")


def _z(alpha: float) -> float:
    return float(stats.norm.ppf(1 - alpha / 2))


def _check(labels, scores) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(labels)
    s = np.asarray(scores, dtype=float)
    if y.ndim != 1 or s.shape != y.shape:
        raise ValueError(f"labels and scores must be 1-D of the same length (got {y.shape} and {s.shape})")
    if not np.isin(y, (0, 1)).all():
        raise ValueError("labels must be 0 (chronic) or 1 (acute)")
    if not np.isfinite(s).all():
        raise ValueError("scores hold NaN or infinite values")
    return y.astype(int), s


def _both_classes(y: np.ndarray) -> None:
    n_pos = int(y.sum())
    if n_pos == 0 or n_pos == len(y):
        only = "acute" if n_pos else "chronic"
        raise ValueError(f"AUC needs both classes: all {len(y)} rows are {only}")


def _placements(y: np.ndarray, s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """DeLong's structural components by midranks (Sun & Xu 2014): for each positive, the share of
    negatives it outscores (ties count half), and for each negative, the share of positives it is outscored by."""
    pos, neg = s[y == 1], s[y == 0]
    m, n = len(pos), len(neg)
    ranks = stats.rankdata(np.concatenate([pos, neg]))
    v10 = (ranks[:m] - stats.rankdata(pos)) / n
    v01 = 1.0 - (ranks[m:] - stats.rankdata(neg)) / m
    return v10, v01


def delong_auc(labels, scores, alpha: float = 0.05) -> dict:
    """AUC with DeLong's standard error and a normal (1 - alpha) CI, clipped to [0, 1]."""
    y, s = _check(labels, scores)
    _both_classes(y)
    v10, v01 = _placements(y, s)
    auc = float(v10.mean())
    se = float(np.sqrt(v10.var(ddof=1) / len(v10) + v01.var(ddof=1) / len(v01))) if min(len(v10), len(v01)) > 1 else 0.0
    half = _z(alpha) * se
    return {"auc": auc, "se": se, "low": max(0.0, auc - half), "high": min(1.0, auc + half)}


def delong_test(labels, scores_a, scores_b) -> dict:
    """Paired DeLong test of two models scored on the same rows: AUCs, their difference, z and the two-sided p."""
    y, a = _check(labels, scores_a)
    _, b = _check(labels, scores_b)
    _both_classes(y)
    (a10, a01), (b10, b01) = _placements(y, a), _placements(y, b)
    s10 = np.cov(np.vstack([a10, b10]))
    s01 = np.cov(np.vstack([a01, b01]))
    cov = s10 / len(a10) + s01 / len(a01)
    var = float(cov[0, 0] + cov[1, 1] - 2 * cov[0, 1])
    diff = float(a10.mean() - b10.mean())
    if var <= 0:
        z, p = (0.0, 1.0) if diff == 0 else (float("inf") * np.sign(diff), 0.0)
    else:
        z = diff / np.sqrt(var)
        p = float(2 * stats.norm.sf(abs(z)))
    return {"auc_a": float(a10.mean()), "auc_b": float(b10.mean()), "difference": diff, "z": float(z), "p": p}


def ci_text(m: dict, pct: bool = False, dash: str = "-") -> str:
    """`value (low-high)` of a metric entry, as a proportion (3 decimals) or in % (1 decimal); n/a for NaN."""
    if m["value"] != m["value"]:  # NaN: no row of that kind
        return "n/a"
    f = (lambda v: f"{100 * v:.1f}") if pct else (lambda v: f"{v:.3f}")
    return f"{f(m['value'])} ({f(m['low'])}{dash}{f(m['high'])})"


def p_value(p: float) -> str:
    """A p-value as papers print it: 4 decimals, or < 0.0001."""
    return "< 0.0001" if p < 1e-4 else f"{p:.4f}"


def wilson(k: int, n: int, alpha: float = 0.05) -> tuple[float, float]:
    """Wilson score interval of a proportion k/n (defined at 0 and n, unlike the Wald interval); NaN when n is 0."""
    if n == 0:
        return float("nan"), float("nan")
    z = _z(alpha)
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def confusion(labels, scores, threshold: float) -> dict:
    """Counts at `threshold` (acute when score >= threshold)."""
    y, s = _check(labels, scores)
    call = s >= threshold
    return {
        "tp": int((call & (y == 1)).sum()),
        "fn": int((~call & (y == 1)).sum()),
        "tn": int((~call & (y == 0)).sum()),
        "fp": int((call & (y == 0)).sum()),
    }


def _fractions(c: dict) -> dict[str, tuple[int, int]]:
    """Numerator and denominator of each rate."""
    return {
        "sensitivity": (c["tp"], c["tp"] + c["fn"]),
        "specificity": (c["tn"], c["tn"] + c["fp"]),
        "accuracy": (c["tp"] + c["tn"], sum(c.values())),
        "ppv": (c["tp"], c["tp"] + c["fp"]),
        "npv": (c["tn"], c["tn"] + c["fn"]),
    }


def rates(c: dict) -> dict[str, float]:
    """Sensitivity, specificity, accuracy, PPV, NPV of confusion counts (NaN where the denominator is 0)."""
    return {name: (k / n if n else float("nan")) for name, (k, n) in _fractions(c).items()}


def youden_threshold(labels, scores) -> float:
    """The score maximising sensitivity + specificity - 1 (Youden's J); ties go to the higher score,
    the more specific call."""
    y, s = _check(labels, scores)
    _both_classes(y)
    best, best_j = None, -np.inf
    for t in np.unique(s)[::-1]:
        r = rates(confusion(y, s, t))
        j = r["sensitivity"] + r["specificity"] - 1
        if j > best_j + 1e-12:
            best, best_j = float(t), j
    return best


def sensitivity_threshold(labels, scores, target: float) -> float:
    """The highest score whose sensitivity reaches `target` (the most specific threshold that does)."""
    if not 0 < target <= 1:
        raise ValueError(f"target sensitivity {target} must lie in (0, 1]")
    y, s = _check(labels, scores)
    if not y.any():
        raise ValueError("a sensitivity target needs acute rows in the validation set")
    pos = np.sort(s[y == 1])[::-1]
    return float(pos[int(np.ceil(target * len(pos))) - 1])


def choose_threshold(labels, scores, rule: str = "youden", sensitivity: float | None = None) -> float:
    """The operating threshold by `rule`: youden, sensitivity (reach `sensitivity`), or fixed (0.5)."""
    if rule == "youden":
        return youden_threshold(labels, scores)
    if rule == "sensitivity":
        if sensitivity is None:
            raise ValueError("threshold rule 'sensitivity' needs a target, e.g. sensitivity=0.9")
        return sensitivity_threshold(labels, scores, sensitivity)
    if rule == "fixed":
        return 0.5
    raise ValueError(f"unknown threshold rule {rule!r}: use youden, sensitivity or fixed")


def cluster_bootstrap(labels, scores, groups, threshold: float, n_boot: int = 2000, seed: int = 0, alpha: float = 0.05) -> dict:
    """Percentile CIs that resample patients, not vertebrae (a patient's vertebrae are correlated):
    {metric: (low, high)} for the AUC and the five rates. Resamples lacking a class are redrawn."""
    y, s = _check(labels, scores)
    g = np.asarray(groups)
    if g.shape != y.shape:
        raise ValueError("groups (patient pseudonyms) must have one entry per row")
    from sklearn.metrics import roc_auc_score

    patients, index = np.unique(g, return_inverse=True)
    rows = [np.flatnonzero(index == i) for i in range(len(patients))]
    rng = np.random.default_rng(seed)
    draws: dict[str, list[float]] = {name: [] for name in ("auc", *RATES)}
    tries = 0
    while len(draws["auc"]) < n_boot:
        tries += 1
        if tries > 20 * n_boot:
            raise ValueError("the bootstrap keeps drawing one class only: too few patients of one label")
        pick = np.concatenate([rows[i] for i in rng.integers(0, len(patients), len(patients))])
        yb, sb = y[pick], s[pick]
        if yb.min() == yb.max():
            continue
        draws["auc"].append(roc_auc_score(yb, sb))
        for name, value in rates(confusion(yb, sb, threshold)).items():
            draws[name].append(value)
    q = [100 * alpha / 2, 100 * (1 - alpha / 2)]
    return {name: tuple(float(v) for v in np.nanpercentile(values, q)) for name, values in draws.items()}


def diagnostic_metrics(
    labels,
    scores,
    threshold: float,
    groups=None,
    ci: str = "wilson",
    n_boot: int = 2000,
    seed: int = 0,
    alpha: float = 0.05,
) -> dict:
    """Everything a results table holds for one model on one set of rows.

    Returns {"n", "threshold", "confusion", "auc": {value, low, high, se}, rate: {value, low, high,
    k, n}, "brier", "ci"}. `ci` is "wilson" (rates; DeLong for the AUC) or "bootstrap" (all of them by
    the patient-cluster bootstrap over `groups`).
    """
    y, s = _check(labels, scores)
    if ci not in ("wilson", "bootstrap"):
        raise ValueError(f"ci={ci!r}: use wilson or bootstrap")
    counts = confusion(y, s, threshold)
    out = {"n": int(len(y)), "n_acute": int(y.sum()), "threshold": float(threshold), "confusion": counts, "ci": ci}
    d = delong_auc(y, s, alpha)
    out["auc"] = {"value": d["auc"], "low": d["low"], "high": d["high"], "se": d["se"]}
    for name, (k, n) in _fractions(counts).items():
        low, high = wilson(k, n, alpha)
        out[name] = {"value": k / n if n else float("nan"), "low": low, "high": high, "k": k, "n": n}
    if ci == "bootstrap":
        if groups is None:
            raise ValueError("ci=bootstrap needs groups (the patient of each row)")
        for name, (low, high) in cluster_bootstrap(y, s, groups, threshold, n_boot, seed, alpha).items():
            out[name].update(low=low, high=high)
    out["brier"] = float(np.mean((s - y) ** 2))
    return out


def calibration(labels, scores, bins: int = 5) -> dict:
    """Observed acute fraction per bin of predicted probability (quantile bins, so each holds rows)."""
    from sklearn.calibration import calibration_curve

    y, s = _check(labels, scores)
    observed, predicted = calibration_curve(y, s, n_bins=bins, strategy="quantile")
    return {"predicted": predicted.tolist(), "observed": observed.tolist(), "brier": float(np.mean((s - y) ** 2))}


def buderer_sample_size(
    sensitivity: float = 0.9,
    specificity: float | None = None,
    error: float = 0.05,
    alpha: float = 0.05,
    prevalence: float = 0.5,
) -> dict:
    """Buderer (1996): positives needed to estimate `sensitivity` to +-`error`, negatives for
    `specificity` (default: the same value), and the total at `prevalence` that gives both.

    Counts are rounded to the nearest integer, as the study protocol did (138 acute + 138 chronic
    = 276 at 0.9 +- 0.05); `exact` holds the unrounded values and `conservative` the rounded-up ones.
    """
    specificity = sensitivity if specificity is None else specificity
    for name, v in (("sensitivity", sensitivity), ("specificity", specificity), ("error", error), ("alpha", alpha)):
        if not 0 < v < 1:
            raise ValueError(f"{name}={v} must lie strictly between 0 and 1")
    if not 0 < prevalence < 1:
        raise ValueError(f"prevalence={prevalence} must lie strictly between 0 and 1")
    z2 = _z(alpha) ** 2
    pos = z2 * sensitivity * (1 - sensitivity) / error**2
    neg = z2 * specificity * (1 - specificity) / error**2
    exact = {"acute": pos, "chronic": neg, "total": max(pos / prevalence, neg / (1 - prevalence))}
    n_pos, n_neg = round(pos), round(neg)
    total = max(round(n_pos / prevalence), round(n_neg / (1 - prevalence)))
    return {
        "acute": n_pos,
        "chronic": n_neg,
        "total": total,
        "exact": exact,
        "conservative": _rounded_up(pos, neg, prevalence),
        "inputs": {
            "sensitivity": sensitivity,
            "specificity": specificity,
            "error": error,
            "alpha": alpha,
            "prevalence": prevalence,
        },
    }


def _rounded_up(pos: float, neg: float, prevalence: float) -> dict:
    up = {"acute": int(np.ceil(pos - 1e-9)), "chronic": int(np.ceil(neg - 1e-9))}
    return up | {"total": int(max(np.ceil(up["acute"] / prevalence - 1e-9), np.ceil(up["chronic"] / (1 - prevalence) - 1e-9)))}


def achieved_half_width(value: float, n: int, alpha: float = 0.05) -> float:
    """Half-width of the Wald CI that n rows afford for a proportion near `value` (the inverse of Buderer)."""
    return _z(alpha) * float(np.sqrt(value * (1 - value) / n)) if n else float("nan")


# --- scores a training run logs ----------------------------------------------------------------


def binary_metrics(prefix: str = "") -> MetricCollection:
    """AUROC, and accuracy, sensitivity and specificity at probability 0.5 (acute is positive): a
    classifier's epoch metrics, and the fold ensemble's, computed the same way."""
    return MetricCollection(
        {
            "auroc": BinaryAUROC(),
            "accuracy": BinaryAccuracy(),
            "sensitivity": BinaryRecall(),
            "specificity": BinarySpecificity(),
        },
        prefix=prefix,
    )


def binary_scores(labels, probabilities) -> dict[str, float]:
    """`binary_metrics` of whole arrays (labels 0/1, acute probabilities), as plain floats."""
    metrics = binary_metrics()
    metrics.update(torch.as_tensor(probabilities, dtype=torch.float32), torch.as_tensor(labels, dtype=torch.int64))
    return {name: float(value) for name, value in metrics.compute().items()}


def label_confusion(pred: torch.Tensor, truth: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Voxel counts (num_classes, num_classes) of two label maps: rows the true class, columns the predicted one."""
    index = truth.reshape(-1).long() * num_classes + pred.reshape(-1).long()
    return torch.bincount(index, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def level_scores(cm: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-level Dice and level identification of one volume, from its confusion matrix.

    Dice of level c is 2 |P_c & T_c| / (|P_c| + |T_c|): every voxel predicted as c counts against it, wherever it lies,
    including on another vertebra. Dice is only defined for levels present in the ground truth (NaN otherwise, as
    MONAI's `ignore_empty`): a level predicted but absent from the truth has no Dice of its own; its voxels lower the
    Dice of the true levels they were taken from, and it is counted by `spurious` instead.

    A true body is identified when the majority of its voxels predicted as some vertebra (background ignored) carry its
    own level; a body predicted entirely as background is not identified.

    Returns:
        dice: (K - 1,) float, NaN for levels absent from the truth.
        identified: (K - 1,) bool, meaningful only where the level is present in the truth.
        spurious: (K - 1,) bool, levels predicted somewhere but absent from the truth.
    """
    cm = cm.double()
    truth, pred, hit = cm.sum(1)[1:], cm.sum(0)[1:], cm.diagonal()[1:]
    present = truth > 0
    dice = torch.where(present, 2 * hit / (truth + pred).clamp_min(1), torch.full_like(hit, float("nan")))
    foreground = cm[1:, 1:]
    identified = (foreground.argmax(1) == torch.arange(len(hit), device=cm.device)) & (foreground.sum(1) > 0)
    return dice, identified & present, (pred > 0) & ~present


def dice(pred: np.ndarray, truth: np.ndarray) -> float:
    """Dice of two binary masks (NaN when both are empty)."""
    pred, truth = np.asarray(pred, bool), np.asarray(truth, bool)
    total = int(pred.sum()) + int(truth.sum())
    return 2.0 * int((pred & truth).sum()) / total if total else float("nan")


def label_dice(pred: np.ndarray, truth: np.ndarray) -> dict[int, float]:
    """Dice of every label present in `truth` against the same label in `pred` (label maps on one grid)."""
    n = int(max(pred.max(initial=0), truth.max(initial=0))) + 1
    cm = label_confusion(torch.from_numpy(np.asarray(pred, np.int64)), torch.from_numpy(np.asarray(truth, np.int64)), n)
    scores, _, _ = level_scores(cm)
    return {label + 1: float(d) for label, d in enumerate(scores.tolist()) if d == d}


def matched_dice(pred: np.ndarray, truth: np.ndarray) -> dict[int, float]:
    """Dice of every true label with the predicted label that overlaps it most, whatever its number.

    Separates outlining from naming: a count that is off by one level scores 0 in `label_dice` but
    full marks here when every body is outlined well.
    """
    out = {}
    for label in sorted(int(v) for v in np.unique(truth) if v):
        t = truth == label
        ids, counts = np.unique(pred[t], return_counts=True)
        counts, ids = counts[ids > 0], ids[ids > 0]
        out[label] = dice(pred == ids[np.argmax(counts)], t) if len(ids) else 0.0
    return out
