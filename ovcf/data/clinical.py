"""Reads and validates `clinical.csv`: one row per fractured vertebra.

Missing or repeated columns stop the cohort (nothing can be done without them); a bad value stops
only its own row, which is excluded with the reason `invalid` and a message naming the field. Every
departure from the contract is read with a named flag or refused, never silently accepted: a
non-UTF-8 file (`csv_not_utf8`), `;` separators (`csv_semicolon`), a row repeated exactly
(`duplicate_row`: read once), two different rows for one vertebra (both `invalid`). Messages name
columns, row numbers and levels only, never the CSV's values: they end up in logs and caches.

The optional column `signs` (the CT signs read on the fracture, see `ovcf.contract.SIGNS`) is sign
supervision, not a protocol field: an unknown sign name stops the whole cohort with one error listing
the rows and the allowed names, because a misspelt vocabulary is a property of the export (every
row of the site is wrong the same way), and excluding those rows would drop fractures whose
acute/chronic label is fine.
"""

from __future__ import annotations

import codecs
import csv
import datetime as dt
import io
from dataclasses import dataclass, field
from pathlib import Path

from ovcf.contract import (
    AGE_RANGE,
    DEFAULT_ETIOLOGY,
    LABELS,
    LEVEL_IDS,
    MAX_CT_MRI_DAYS,
    MIN_AGE,
    OPTIONAL_COLUMNS,
    REQUIRED_COLUMNS,
    SEXES,
    SIGNS,
    SIGNS_COLUMN,
    SIGNS_UNKNOWN,
    T_SCORE_RANGE,
)
from ovcf.data.pseudonym import pseudonym
from ovcf.errors import CohortError

NOT_UTF8 = "csv_not_utf8"
SEMICOLON = "csv_semicolon"
DUPLICATE_ROW = "duplicate_row"
# Fields that must agree for two rows of one patient and level to be the same row (values as read).
COMPARED = ("center", "age", "sex", "dxa_t_score", "ct_date", "mri_date", "label", "etiology", "ct_series_uid", "signs")


def _latin1(error: UnicodeDecodeError) -> tuple[str, int]:
    """Decodes the bytes Windows-1252 leaves undefined (0x81, 0x8D, 0x8F, 0x90, 0x9D) as Latin-1 does."""
    return error.object[error.start : error.end].decode("latin-1"), error.end


codecs.register_error("ovcf_latin1", _latin1)


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
    signs: tuple[str, ...] | None = None  # CT signs read on the fracture (names of SIGNS); None: no sign labels
    problems: list[str] = field(default_factory=list)  # messages behind the reason `invalid`
    flags: list[str] = field(default_factory=list)  # how the row was read, for a reviewer; not exclusions
    notes: list[str] = field(default_factory=list)  # messages behind the flags

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


@dataclass
class _Table:
    """The CSV as text: (row number, stripped cells by contract column) and how it was read."""

    records: list[tuple[int, dict[str, str]]]
    flags: list[str]
    decimal_comma: bool
    has_signs: bool = False  # the header has the optional `signs` column


def _decode(path: Path) -> tuple[str, list[str]]:
    """The file's text: UTF-8 (with or without BOM), else Windows-1252, flagged.

    Excel on Windows saves "CSV" in the ANSI code page (Windows-1252 in Western Europe); the required
    columns and most values are ASCII, which read the same, so the file is read and every row flagged
    for a reviewer rather than refused. Never `UnicodeDecodeError`: its repr carries the whole file.
    """
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig"), []
    except UnicodeDecodeError:
        return data.decode("cp1252", errors="ovcf_latin1"), [NOT_UTF8]


def _first_row(text: str, delimiter: str) -> list[str]:
    """The header's stripped column names when split at `delimiter`."""
    return [c.strip() for c in next(csv.reader(io.StringIO(text, newline=""), delimiter=delimiter), [])]


def _read_table(path: Path) -> _Table:
    """Decodes the file and splits it into cells; raises `CohortError` on a missing file or a bad header.

    The delimiter is `,` unless only `;` (European Excel) gives a header with the required columns;
    such files write decimals with a comma, which the numbers then accept.
    """
    if not path.is_file():
        raise CohortError(f"{path} not found: a cohort folder needs clinical.csv (one row per fractured vertebra)")
    text, flags = _decode(path)
    headers = {d: _first_row(text, d) for d in (",", ";")}
    delimiter = max(headers, key=lambda d: sum(c in headers[d] for c in REQUIRED_COLUMNS))  # `,` on a tie
    columns = headers[delimiter]
    missing = [c for c in REQUIRED_COLUMNS if c not in columns]
    if missing:
        raise CohortError(
            f"{path} lacks required column(s) {', '.join(missing)}; add them (required: {', '.join(REQUIRED_COLUMNS)}, "
            "separated by ',' (or ';'), names case-sensitive)"
        )
    repeated = next((c for i, c in enumerate(columns) if c and c in columns[:i]), None)
    if repeated is not None:
        raise CohortError(f"{path} has the column '{repeated}' more than once in its header; keep one")
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter)
    records = []
    try:
        next(reader)
        for cells in reader:
            if cells:  # a blank line is no row (as csv.DictReader)
                values = {c: v.strip() for c, v in zip(columns, cells) if c}
                kept = (*REQUIRED_COLUMNS, *OPTIONAL_COLUMNS, SIGNS_COLUMN)
                records.append((len(records) + 1, {c: values.get(c, "") for c in kept}))
    except csv.Error as exc:  # its message names the problem, never the cell
        raise CohortError(f"{path} line {reader.line_num} is not valid CSV ({exc}); fix its quoting") from None
    return _Table(records, flags + ([SEMICOLON] if delimiter == ";" else []), delimiter == ";", SIGNS_COLUMN in columns)


def _date(text: str, column: str, problems: list[str]) -> dt.date | None:
    """The date, or None (with a problem when the text is not empty and not YYYY-MM-DD)."""
    if not text:
        return None
    try:
        return dt.date.fromisoformat(text)
    except ValueError:
        problems.append(f"{column} is not a YYYY-MM-DD date")
        return None


def _number(
    text: str, column: str, limits: tuple[float, float], problems: list[str], required: bool, decimal_comma: bool
) -> float | None:
    """The value, or None with a problem when it is empty (if `required`), not a number, nan, inf or outside `limits`."""
    if not text:
        if required:
            problems.append(f"{column} is empty")
        return None
    try:
        value = float(text.replace(",", ".") if decimal_comma else text)
    except ValueError:
        value = float("nan")
    low, high = limits
    if not low <= value <= high:  # nan fails every comparison
        problems.append(f"{column} is not a number from {low:g} to {high:g}")
        return None
    return value


def _parse(number: int, raw: dict[str, str], table: _Table) -> ClinicalRow:
    """One row, with a problem per bad field (named, its value left out) and the file's flags."""
    problems: list[str] = []
    level, label, sex = raw["level"].upper(), raw["label"].lower(), raw["sex"].upper()
    patient_id = raw["patient_id"].replace(" ", "")
    if level not in LEVEL_IDS:
        problems.append("level is not one of C1..C7, T1..T13, L1..L6")
    if label not in LABELS:
        problems.append("label is not acute or chronic")
    if sex not in SEXES:
        problems.append("sex is not F or M")
    if not patient_id:
        problems.append("patient_id is empty")
    if not raw["center"]:
        problems.append("center is empty")
    comma = table.decimal_comma
    return ClinicalRow(
        row=number,
        patient_id=patient_id,
        center=raw["center"],
        level=level,
        label=label,
        age=_number(raw["age"], "age", AGE_RANGE, problems, required=True, decimal_comma=comma),
        sex=sex,
        dxa_t_score=_number(raw["dxa_t_score"], "dxa_t_score", T_SCORE_RANGE, problems, required=False, decimal_comma=comma),
        ct_date=_date(raw["ct_date"], "ct_date", problems),
        mri_date=_date(raw["mri_date"], "mri_date", problems),
        etiology=(raw["etiology"] or DEFAULT_ETIOLOGY).lower(),
        ct_series_uid=raw["ct_series_uid"],
        signs=parse_signs(raw[SIGNS_COLUMN]) if table.has_signs else None,
        problems=problems,
        flags=list(table.flags),
    )


def parse_signs(text: str) -> tuple[str, ...] | None:
    """A `signs` cell as sorted sign names: "" none, "?" not read (None); names are case- and space-insensitive.

    Raises:
        ValueError: a name that is not one of `SIGNS` (the caller names the row; the value is not repeated).
    """
    if text.strip() == SIGNS_UNKNOWN:
        return None
    names = {n.strip().lower().replace(" ", "_") for n in text.split(";")} - {""}
    if not names <= set(SIGNS):
        raise ValueError("unknown sign name")
    return tuple(sorted(names))


def _check_signs(table: _Table, path: Path) -> None:
    """Raises `CohortError` naming the rows whose `signs` cell holds a name outside `SIGNS` (their values left out)."""
    bad = []
    for number, raw in table.records:
        try:
            parse_signs(raw[SIGNS_COLUMN])
        except ValueError:
            bad.append(number)
    if bad:
        raise CohortError(
            f"{path}: column {SIGNS_COLUMN} of row(s) {_rows(bad[:10])}{' ...' if len(bad) > 10 else ''} names a sign "
            f"that is not one of {', '.join(SIGNS)}; write those names joined by ';' ('' for none, '{SIGNS_UNKNOWN}' "
            f"for not read), or remove the column"
        )


def _rows(numbers) -> str:
    """Row numbers as a message lists them: `3, 7`."""
    return ", ".join(str(n) for n in numbers)


def _merge_repeats(rows: list[ClinicalRow]) -> list[ClinicalRow]:
    """One row per patient and level: exact copies are dropped (the kept row is flagged `duplicate_row`),
    rows that differ are all made `invalid`, since which one is right cannot be told."""
    groups: dict[tuple[str, str], list[ClinicalRow]] = {}
    for r in rows:
        if r.patient_id:
            groups.setdefault((r.patient_id, r.level), []).append(r)
    dropped = set()
    for (_, level), group in groups.items():
        kept: dict[tuple, tuple[ClinicalRow, list[int]]] = {}
        for r in group:
            values = tuple(getattr(r, name) for name in COMPARED)
            if values in kept:
                kept[values][1].append(r.row)
                dropped.add(r.row)
            else:
                kept[values] = (r, [])
        for r, copies in kept.values():
            if copies:
                r.flags.append(DUPLICATE_ROW)
                r.notes.append(f"{DUPLICATE_ROW}: row(s) {_rows(copies)} repeat this row exactly; read once")
        if len(kept) > 1:
            distinct = [r for r, _ in kept.values()]
            differ = [name for name in COMPARED if len({getattr(r, name) for r in distinct}) > 1]
            note = (
                f"rows {_rows(r.row for r in distinct)} give level {level} of one patient different {', '.join(differ)}; "
                "keep the right one"
            )
            for r in distinct:
                r.problems.append(note)
    return [r for r in rows if r.row not in dropped]


def check_clinical(path: Path) -> None:
    """Raises `CohortError` when the CSV is missing, lacks required columns, repeats one or names an unknown sign."""
    table = _read_table(path)
    if table.has_signs:
        _check_signs(table, path)


def has_signs(path: Path) -> bool:
    """Whether the CSV has the optional `signs` column (sign labels for the classifier's sign heads)."""
    return _read_table(path).has_signs


def read_centers(path: Path) -> list[str]:
    """The distinct `center` values, sorted (the default development center is the first), as ingest reads them."""
    return sorted({r.center for r in read_clinical(path)} - {""})


def read_clinical(path: Path) -> list[ClinicalRow]:
    """Parses the CSV, one row per patient and level; raises `CohortError` on a missing file or a bad header."""
    table = _read_table(path)
    if table.has_signs:
        _check_signs(table, path)  # before any row: one error for the cohort, not one per row
    return _merge_repeats([_parse(number, raw, table) for number, raw in table.records])


def check_one_center(rows: list[ClinicalRow], key: bytes) -> None:
    """Raises `CohortError` when a patient has rows under two centers, naming the first by pseudonym.

    Such a patient would be in the development folds and the external test set at once, which the
    external validation rests on never happening; which center is right only the site can tell.
    """
    centers: dict[str, dict[str, list[int]]] = {}
    for r in rows:
        if r.patient_id and r.center:
            centers.setdefault(r.patient_id, {}).setdefault(r.center, []).append(r.row)
    split = {pid: by_center for pid, by_center in centers.items() if len(by_center) > 1}
    if split:
        pid, by_center = next(iter(split.items()))
        others = f" (and {len(split) - 1} more patient(s))" if len(split) > 1 else ""
        raise CohortError(
            f"clinical.csv: patient {pseudonym(pid, key)} has rows under {len(by_center)} centers "
            f"(rows {_rows(sorted(n for numbers in by_center.values() for n in numbers))}){others}; "
            "a patient belongs to exactly one center: correct the center of those rows"
        )
