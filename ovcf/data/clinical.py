"""Reads and validates `clinical.csv`: one row per fractured vertebra.

Missing columns stop the cohort (nothing can be done without them); a bad value stops only
its own row, which is excluded with the reason `invalid` and a message naming the field.
"""

from __future__ import annotations

import csv
import datetime as dt
from dataclasses import dataclass, field
from pathlib import Path

from ovcf.contract import (
    DEFAULT_ETIOLOGY,
    LABELS,
    LEVEL_IDS,
    MAX_CT_MRI_DAYS,
    MIN_AGE,
    OPTIONAL_COLUMNS,
    REQUIRED_COLUMNS,
    SEXES,
)
from ovcf.errors import CohortError


@dataclass
class ClinicalRow:
    """One parsed row; `row` is its number under the header (the first data row is 1)."""

    row: int
    patient_id: str
    center: str
    level: str
    label: str
    age: float | None = None
    sex: str = ""
    dxa_t_score: float | None = None
    ct_date: dt.date | None = None
    mri_date: dt.date | None = None
    etiology: str = DEFAULT_ETIOLOGY
    ct_series_uid: str = ""
    problems: list[str] = field(default_factory=list)  # messages behind the reason `invalid`

    def exclusions(self, ct_date: dt.date | None = None) -> list[str]:
        """Protocol criteria this row fails; `ct_date` is the DICOM date used when the CSV has none."""
        reasons = []
        if self.problems:
            reasons.append("invalid")
        if self.age is not None and self.age < MIN_AGE:
            reasons.append("age")
        if self.etiology != DEFAULT_ETIOLOGY:
            reasons.append("etiology")
        ct = self.ct_date or ct_date
        if ct is not None and self.mri_date is not None and abs((self.mri_date - ct).days) > MAX_CT_MRI_DAYS:
            reasons.append("interval")
        return reasons


def _date(text: str, column: str, problems: list[str]) -> dt.date | None:
    if not text:
        return None
    try:
        return dt.date.fromisoformat(text)
    except ValueError:
        problems.append(f"{column} '{text}' is not a YYYY-MM-DD date")
        return None


def _number(text: str, column: str, problems: list[str], required: bool) -> float | None:
    if not text:
        if required:
            problems.append(f"{column} is empty")
        return None
    try:
        return float(text)
    except ValueError:
        problems.append(f"{column} '{text}' is not a number")
        return None


def _check_columns(path: Path, fieldnames) -> None:
    columns = [c.strip() for c in fieldnames or []]
    missing = [c for c in REQUIRED_COLUMNS if c not in columns]
    if missing:
        raise CohortError(
            f"{path} lacks required column(s) {', '.join(missing)}; add them (required: {', '.join(REQUIRED_COLUMNS)})"
        )


def check_clinical(path: Path) -> None:
    """Raises `CohortError` when the CSV is missing or lacks required columns (reads the header only)."""
    if not path.is_file():
        raise CohortError(f"{path} not found: a cohort folder needs clinical.csv (one row per fractured vertebra)")
    with open(path, newline="", encoding="utf-8-sig") as fh:
        _check_columns(path, csv.DictReader(fh).fieldnames)


def read_centers(path: Path) -> list[str]:
    """The distinct `center` values, sorted (the default development center is the first)."""
    with open(path, newline="", encoding="utf-8-sig") as fh:
        return sorted({(r.get("center") or "").strip() for r in csv.DictReader(fh)} - {""})


def read_clinical(path: Path) -> list[ClinicalRow]:
    """Parses the CSV; raises `CohortError` when it is missing or lacks required columns."""
    check_clinical(path)
    with open(path, newline="", encoding="utf-8-sig") as fh:
        reader = csv.DictReader(fh)
        rows = []
        for number, raw in enumerate(reader, start=1):
            raw = {k.strip(): (v or "").strip() for k, v in raw.items() if k is not None}
            for c in OPTIONAL_COLUMNS:
                raw.setdefault(c, "")
            problems: list[str] = []
            level, label, sex = raw["level"].upper(), raw["label"].lower(), raw["sex"].upper()
            if level not in LEVEL_IDS:
                problems.append(f"level '{raw['level']}' is not one of C1..C7, T1..T13, L1..L6")
            if label not in LABELS:
                problems.append(f"label '{raw['label']}' is not acute or chronic")
            if sex not in SEXES:
                problems.append(f"sex '{raw['sex']}' is not F or M")
            if not raw["patient_id"].replace(" ", ""):
                problems.append("patient_id is empty")
            rows.append(
                ClinicalRow(
                    row=number,
                    patient_id=raw["patient_id"].replace(" ", ""),
                    center=raw["center"],
                    level=level,
                    label=label,
                    age=_number(raw["age"], "age", problems, required=True),
                    sex=sex,
                    dxa_t_score=_number(raw["dxa_t_score"], "dxa_t_score", problems, required=False),
                    ct_date=_date(raw["ct_date"], "ct_date", problems),
                    mri_date=_date(raw["mri_date"], "mri_date", problems),
                    etiology=(raw["etiology"] or DEFAULT_ETIOLOGY).lower(),
                    ct_series_uid=raw["ct_series_uid"],
                    problems=problems,
                )
            )
    return rows
