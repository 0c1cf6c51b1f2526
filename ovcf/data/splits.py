"""Patient-level splits: every row of a patient falls in the same part.

The unit of analysis is the vertebra but the unit of splitting is the patient, so that no
patient's other fracture (same bone density, same scanner) leaks from training into validation.
A cohort of one center (contract, "Splits") has patient folds and no external test set.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from sklearn.model_selection import GroupKFold, StratifiedGroupKFold

from ovcf.atomic import write_json
from ovcf.contract import LABELS
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


def one_center_note(dev: str) -> str:
    """What a run of a one-center cohort says in its log, `results.json` and evaluation: its figures
    come from patient folds of that center, so no one reads them as external validation."""
    return (
        f"One center ({dev}) and no external center: these figures are internal validation on patient folds of {dev}, "
        "not external validation"
    )


def cohort_splits(index: list[dict], dev: str, external: str | None, n_folds: int, seed: int) -> dict:
    """The k patient folds of the development center and the external test set, by pseudonym and row.

    What `splits.json` holds: enough to rebuild every part of every fold without the data, and
    proof that the external center appears in no fold. `external` None (a one-center cohort):
    `external_center` and `test` are null.
    """
    dev_rows = [r for r in index if r["included"] and r["center"] == dev]
    fold = patient_folds([LABELS.index(r["label"]) for r in dev_rows], [r["pseudonym"] for r in dev_rows], n_folds, seed)
    parts = []
    for f in range(n_folds):
        rows = [r for r, k in zip(dev_rows, fold) if k == f]
        parts.append({"fold": f, **_part(rows)})
    test = None if external is None else _part([r for r in index if r["included"] and r["center"] == external])
    return {"seed": seed, "n_folds": n_folds, "dev_center": dev, "external_center": external, "folds": parts, "test": test}


def _part(rows: list[dict]) -> dict:
    return {
        "patients": sorted({r["pseudonym"] for r in rows}),
        "rows": sorted(r["row"] for r in rows),
        "acute": sum(r["label"] == "acute" for r in rows),
        "chronic": sum(r["label"] == "chronic" for r in rows),
    }


def write_splits(path: Path, splits: dict) -> None:
    """Written atomically: parallel sweep jobs may write the same file."""
    write_json(path, splits)
