"""Prediction records (one row per vertebra: pseudonym, level, set, label, probability, fold) as
CSV and as arrays: what training, evaluate and the study write and read back."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ovcf.atomic import write_csv

COLUMNS = ("pseudonym", "level", "set", "label", "probability", "fold")


def write_predictions(path: Path, records: list[dict], first: list[str] | None = None) -> None:
    """Prediction records as CSV: the `first` columns, then every other key in order of appearance."""
    columns = list(dict.fromkeys([*(first or ["id", "label", "probability"]), *(k for r in records for k in r)]))
    write_csv(path, records, columns, restval="")


def arrays(records: list[dict]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Labels, probabilities and patients of prediction records."""
    return (
        np.array([r["label"] for r in records], dtype=int),
        np.array([r["probability"] for r in records], dtype=float),
        np.array([r["pseudonym"] for r in records]),
    )
