"""Patient-level splits: every row of a patient falls in the same part.

The unit of analysis is the vertebra but the unit of splitting is the patient, so that no
patient's other fracture (same bone density, same scanner) leaks from training into validation.
"""

from __future__ import annotations

import numpy as np
from sklearn.model_selection import GroupKFold, StratifiedGroupKFold

from ovcf.errors import CohortError


def patient_folds(labels: list[int], groups: list[str], n_folds: int, seed: int) -> np.ndarray:
    """Fold number per row for `n_folds` folds, stratified by label and grouped by patient.

    Patients are numbered in order of first appearance, so the folds depend on the rows and the
    seed but not on the pseudonym key (another key, same folds).
    """
    first: dict[str, int] = {}
    ids = np.array([first.setdefault(g, len(first)) for g in groups])
    if len(first) < n_folds:
        raise CohortError(f"the development center has {len(first)} patient(s); at least {n_folds} are needed to split it")
    y = np.asarray(labels, int)
    if np.bincount(y).min(initial=len(labels)) >= n_folds:
        splitter = StratifiedGroupKFold(n_splits=n_folds, shuffle=True, random_state=seed)
    else:  # too few rows of a label to stratify (tiny cohorts): grouped only
        splitter = GroupKFold(n_splits=n_folds, shuffle=True, random_state=seed)
    fold = np.empty(len(y), int)
    for f, (_, val) in enumerate(splitter.split(np.zeros(len(y)), y, ids)):
        fold[val] = f
    return fold


def train_val_split(labels: list[int], groups: list[str], val_fraction: float, seed: int) -> np.ndarray:
    """Boolean mask of validation rows, about `val_fraction` of the patients."""
    n_folds = max(2, int(round(1 / val_fraction)))
    return patient_folds(labels, groups, n_folds, seed) == 0
