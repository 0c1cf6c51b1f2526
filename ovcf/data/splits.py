"""Patient-level splits: every row of a patient falls in the same part.

The unit of analysis is the vertebra but the unit of splitting is the patient, so that no
patient's other fracture (same bone density, same scanner) leaks from training into validation.
"""

from __future__ import annotations

import numpy as np
from sklearn.model_selection import GroupKFold, StratifiedGroupKFold

from ovcf.errors import CohortError


def patient_folds(labels: list[int], groups: list[str], n_folds: int, seed: int) -> list[np.ndarray]:
    """Fold number per row for `n_folds` folds, stratified by label and grouped by patient.

    Rows are first ordered by (patient, label) so that the result depends only on the data and
    the seed, not on the order of the CSV.
    """
    n_patients = len(set(groups))
    if n_patients < n_folds:
        raise CohortError(f"the development center has {n_patients} patient(s); at least {n_folds} are needed to split it")
    order = np.lexsort((np.asarray(labels), np.asarray(groups)))
    if np.bincount(np.asarray(labels, int)).min(initial=len(labels)) >= n_folds:
        splitter = StratifiedGroupKFold(n_splits=n_folds, shuffle=True, random_state=seed)
    else:  # too few rows of a label to stratify (tiny cohorts): grouped only
        splitter = GroupKFold(n_splits=n_folds, shuffle=True, random_state=seed)
    fold = np.empty(len(labels), int)
    y, g = np.asarray(labels)[order], np.asarray(groups)[order]
    for f, (_, val) in enumerate(splitter.split(np.zeros(len(order)), y, g)):
        fold[order[val]] = f
    return fold


def train_val_split(labels: list[int], groups: list[str], val_fraction: float, seed: int) -> np.ndarray:
    """Boolean mask of validation rows, about `val_fraction` of the patients."""
    n_folds = max(2, int(round(1 / val_fraction)))
    return patient_folds(labels, groups, n_folds, seed) == 0
