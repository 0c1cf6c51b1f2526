"""The cohort flow report: totals add up CONSORT-style and the three files are written and readable."""

from __future__ import annotations

import json

import matplotlib.image

from ovcf.data.flow import code_key, flow_totals, sorted_codes, write_flow

FILES = {
    "files": 1200,
    "dicom": 1180,
    "non_dicom": 15,
    "dicomdir": 1,
    "series": 130,
    "series_rejected": {"missing_slices": 2, "gantry_tilt": 1},
}


def _row(n: int, pseudonym: str, center: str, label: str, reasons=(), flags=(), note: str = "") -> dict:
    """One synthetic clinical row; included exactly when it has no reason."""
    return {
        "row": n,
        "pseudonym": pseudonym,
        "center": center,
        "level": "L1",
        "label": label,
        "included": not reasons,
        "reasons": list(reasons),
        "flags": list(flags),
        "note": note,
    }


def synthetic_rows() -> list[dict]:
    """12 rows, 10 patients, two centers; row 5 has two reasons given out of protocol order; shuffled row order."""
    rows = [
        _row(1, "p01", "A", "acute"),
        _row(2, "p01", "A", "chronic", flags=["two_fractures"]),
        _row(3, "p02", "A", "acute"),
        _row(4, "p03", "A", "chronic", reasons=["age"], note="age 45"),
        _row(5, "p04", "A", "acute", reasons=["implant", "interval"], note="CT 30 days | after MRI"),
        _row(6, "p05", "A", "chronic", reasons=["no_mask"]),
        _row(7, "p06", "B", "acute", flags=["low_dose"]),
        _row(8, "p07", "B", "acute"),
        _row(9, "p07", "B", "chronic", flags=["low_dose", "two_fractures"]),
        _row(10, "p08", "B", "chronic"),
        _row(11, "p09", "B", "acute", reasons=["interval"]),
        _row(12, "p10", "B", "chronic", reasons=["zz_custom"], note="unknown code"),
    ]
    return rows[6:] + rows[:6]


def test_codes_sort_in_protocol_order_then_unknown_alphabetically():
    assert sorted_codes(["no_mask", "zeta", "age", "alpha", "implant"]) == ["age", "implant", "no_mask", "alpha", "zeta"]
    assert code_key("unreadable") < code_key("invalid") < code_key("aaa")


def test_totals_are_exact():
    totals = flow_totals(synthetic_rows(), FILES)
    assert totals["received"] == 12
    assert totals["patients"] == 10
    assert totals["excluded"] == 5
    assert totals["included"] == 7
    assert list(totals["excluded_by_reason"].items()) == [("age", 1), ("interval", 2), ("no_mask", 1), ("zz_custom", 1)]
    assert list(totals["reasons_any"].items()) == [("age", 1), ("interval", 2), ("implant", 1), ("no_mask", 1), ("zz_custom", 1)]
    assert sum(totals["excluded_by_reason"].values()) == totals["excluded"]
    assert totals["included_by_center"] == {
        "A": {"acute": 2, "chronic": 1, "patients": 2},
        "B": {"acute": 2, "chronic": 2, "patients": 3},
    }
    assert totals["flagged"] == {"low_dose": 2, "two_fractures": 2}
    assert totals["files"] == FILES


def test_write_flow_writes_three_readable_files(tmp_path):
    rows = synthetic_rows()
    out = tmp_path / "report" / "flow"
    totals = write_flow(out, rows, FILES, title="Test flow")
    assert totals == flow_totals(rows, FILES)
    assert sorted(p.name for p in out.iterdir()) == ["flow.json", "flow.md", "flow.png"]

    saved = json.loads((out / "flow.json").read_text())
    assert saved["totals"] == totals
    assert [r["row"] for r in saved["rows"]] == list(range(1, 13))
    assert saved["rows"] == sorted(rows, key=lambda r: r["row"])

    md = (out / "flow.md").read_text()
    assert md.startswith("# Test flow")
    for code, n_any in totals["reasons_any"].items():
        assert f"| {code} | {totals['excluded_by_reason'].get(code, 0)} | {n_any} |" in md
    assert "| A | 2 | 1 | 3 | 2 |" in md and "| B | 2 | 2 | 4 | 3 |" in md
    assert "| series_rejected: missing_slices | 2 |" in md and "| dicom | 1180 |" in md
    assert "low_dose: 2, two_fractures: 2" in md
    assert "row 5 (p04, A, L1): interval, implant — CT 30 days | after MRI" in md
    assert md.count("\n- row ") == 5
    assert str(tmp_path) not in md + (out / "flow.json").read_text()

    png = (out / "flow.png").read_bytes()
    assert png.startswith(b"\x89PNG")
    image = matplotlib.image.imread(out / "flow.png")
    assert image.shape[0] > 200 and image.shape[1] > 200


def test_write_flow_handles_no_exclusions_and_no_files(tmp_path):
    rows = [_row(1, "p01", "A", "acute"), _row(2, "p02", "A", "chronic")]
    totals = write_flow(tmp_path, rows, {})
    assert totals["excluded"] == 0 and totals["excluded_by_reason"] == {} and totals["flagged"] == {}
    md = (tmp_path / "flow.md").read_text()
    assert "None recorded." in md and md.rstrip().endswith("None.")
    assert (tmp_path / "flow.png").read_bytes().startswith(b"\x89PNG")
