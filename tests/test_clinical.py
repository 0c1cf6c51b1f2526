"""clinical.csv: every departure from the contract is read with a named reason or refused, never silently accepted."""

from __future__ import annotations

import pytest

from ovcf.contract import REQUIRED_COLUMNS
from ovcf.data.clinical import check_clinical, read_centers, read_clinical
from ovcf.data.ingest import ingest, read_index
from ovcf.data.pseudonym import load_key, pseudonym
from ovcf.data.roi import RoiSpec
from ovcf.errors import CohortError

HEADER = ",".join(REQUIRED_COLUMNS)  # patient_id,center,age,sex,dxa_t_score,mri_date,level,label
PID = "MRNPHI5150"  # planted: no message may carry it


def _line(pid=PID, center="A", age="70", sex="F", t_score="-2.9", mri="2020-01-10", level="L1", label="acute", sep=",") -> str:
    return sep.join([pid, center, age, sex, t_score, mri, level, label])


def _write(folder, lines, header=HEADER, encoding="utf-8"):
    path = folder / "clinical.csv"
    path.write_bytes(("\n".join([header, *lines]) + "\n").encode(encoding))
    return path


def _ingest_index(tmp_path, lines) -> list[dict]:
    """Ingest of a cohort without DICOM (every row `no_ct`): fast, and the CSV's verdicts reach index.csv."""
    cohort = tmp_path / "cohort"
    (cohort / "dicom").mkdir(parents=True)
    _write(cohort, lines)
    return read_index(ingest(cohort, tmp_path / "cache", RoiSpec(16, 2.0), tmp_path / "key", progress=False))


def test_exact_duplicate_rows_are_read_once_and_flagged(tmp_path):
    copy = _line(pid=f" {PID} ", age="70.0", label="Acute")  # equal once stripped and read
    rows = read_clinical(_write(tmp_path, [_line(), _line(level="L2"), _line(), copy]))
    assert [r.row for r in rows] == [1, 2]
    assert rows[0].flags == ["duplicate_row"] and rows[1].flags == []
    assert "3" in rows[0].notes[0] and "4" in rows[0].notes[0] and PID not in rows[0].notes[0]
    assert not rows[0].problems


def test_duplicate_copies_are_no_extra_samples(tmp_path):
    index = _ingest_index(tmp_path, [_line(), _line(level="L2"), _line()])
    assert [r["row"] for r in index] == [1, 2]
    assert "duplicate_row" in index[0]["flags"] and "3" in index[0]["note"]


def test_same_level_with_other_values_invalidates_both_rows(tmp_path):
    rows = read_clinical(_write(tmp_path, [_line(), _line(label="chronic", age="71"), _line(pid="OTHER")]))
    assert [r.row for r in rows] == [1, 2, 3]
    for r in rows[:2]:
        assert "invalid" in r.exclusions()
        (note,) = r.problems
        assert "rows 1, 2" in note and "L1" in note and "label" in note and "age" in note and PID not in note
    assert not rows[2].problems


def test_conflict_note_reaches_the_index(tmp_path):
    index = _ingest_index(tmp_path, [_line(), _line(label="chronic")])
    assert all("invalid" in r["reasons"] and "label" in r["note"] for r in index)


def test_patient_under_two_centers_stops_the_cohort(tmp_path):
    with pytest.raises(CohortError) as err:
        _ingest_index(tmp_path, [_line(), _line(center="B", level="L2"), _line(pid="OTHER", center="B")])
    message = str(err.value)
    assert pseudonym(PID, load_key(tmp_path / "key")) in message and "center" in message
    assert PID not in message and "\n" not in message


@pytest.mark.parametrize(
    "column, value",
    [("age", v) for v in ("nan", "NaN", "inf", "-inf", "121", "-1", "seventy")]
    + [("dxa_t_score", v) for v in ("nan", "inf", "-inf", "-29", "6.5")]
    + [("center", "")],
)
def test_implausible_value_makes_the_row_invalid(tmp_path, column, value):
    (row,) = read_clinical(_write(tmp_path, [_line(**{{"dxa_t_score": "t_score"}.get(column, column): value})]))
    assert "invalid" in row.exclusions()
    assert any(column in p for p in row.problems) and all(value not in p for p in row.problems if value)


def test_plausible_values_and_empty_t_score_are_accepted(tmp_path):
    rows = read_clinical(_write(tmp_path, [_line(age="120", t_score=""), _line(level="L2", age="0", t_score="-8")]))
    assert [r.problems for r in rows] == [[], []]
    assert rows[0].dxa_t_score is None and rows[1].dxa_t_score == -8.0


def test_notes_do_not_quote_the_csv(tmp_path):
    (row,) = read_clinical(_write(tmp_path, [_line(mri="1923-04-05x", level="L1", sex="ZYXWVUTPHI", label="QWERTYPHI")]))
    assert len(row.problems) == 3
    assert not any(text in p for p in row.problems for text in ("1923", "ZYXWVUTPHI", "QWERTYPHI"))


@pytest.mark.parametrize("header", [HEADER + ",age", HEADER + ", age ", HEADER.replace("center", "center,center")])
def test_repeated_header_column_is_refused(tmp_path, header):
    name = "center" if "center,center" in header else "age"
    path = _write(tmp_path, [_line() + ",70"], header=header)
    for read in (check_clinical, read_clinical):
        with pytest.raises(CohortError) as err:
            read(path)
        assert f"'{name}'" in str(err.value) and "\n" not in str(err.value)


def test_non_utf8_csv_is_read_as_cp1252_and_flagged_without_leaking_it(tmp_path, capfd):
    path = _write(
        tmp_path, [_line(center="Hôpital") + ",5 €", _line(level="L2", center="Hôpital") + ",x"], HEADER + ",cost", "cp1252"
    )
    path.write_bytes(path.read_bytes() + _line(pid="OTHER", center="B").encode() + b",\x81\n")  # undefined in cp1252
    raised, rows = "", []
    try:
        rows = read_clinical(path)
    except Exception as exc:  # noqa: BLE001 - what it says is the point of the test
        raised = f"{exc} {exc!r}"
    printed = capfd.readouterr()
    for text in (raised, printed.out, printed.err):
        assert PID not in text
    assert [r.row for r in rows] == [1, 2, 3]
    assert all(r.flags == ["csv_not_utf8"] and not r.problems for r in rows)
    assert rows[0].center == "Hôpital" and read_centers(path) == ["B", "Hôpital"]


def test_semicolon_csv_with_decimal_commas_is_read(tmp_path):
    lines = [_line(age="70,5", t_score="-2,9", sep=";"), _line(level="L2", center="B", sep=";")]
    path = _write(tmp_path, lines, HEADER.replace(",", ";"))
    rows = read_clinical(path)
    assert [(r.center, r.level, r.age, r.dxa_t_score, r.problems) for r in rows] == [
        ("A", "L1", 70.5, -2.9, []),
        ("B", "L2", 70.0, -2.9, []),
    ]
    assert all(r.flags == ["csv_semicolon"] for r in rows)
    assert read_centers(path) == ["A", "B"]
    check_clinical(path)


def test_header_in_no_delimiter_is_refused_with_a_hint(tmp_path):
    with pytest.raises(CohortError) as err:
        check_clinical(_write(tmp_path, [_line(sep="\t")], HEADER.replace(",", "\t")))
    assert "patient_id" in str(err.value) and "separated" in str(err.value)
