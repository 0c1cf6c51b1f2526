"""The protocol's exclusions on a cohort with planted problems: each caught, with its reason, and nothing else.

The generator plants one patient per problem and center (`synthetic.plant`); on top of that the
export gets what PACS exports hold and the reader must shrug off: an exact duplicate slice without
extension, a file without preamble, a text file. One clean patient's mask loses the fractured
level, which must be flagged, not excluded.
"""

from __future__ import annotations

import csv
import json
import shutil

import nibabel as nib
import numpy as np
import pytest
from conftest import synthetic_params

from ovcf.contract import EXCLUSION_CODES, LEVEL_IDS
from ovcf.data import ingest as ingest_module
from ovcf.data.ingest import ingest, read_index
from ovcf.data.roi import RoiSpec

ROI = RoiSpec(24, 2.0)


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    from ovcf.synth.cohort import generate_cohort

    out = tmp_path_factory.mktemp("planted")
    plant = {code: 1 for code in EXCLUSION_CODES}
    generate_cohort(out, num_workers=2, progress=False, **synthetic_params(patients_per_center=9, n_levels=[5, 5], plant=plant))
    truth = json.loads((out / "synth.json").read_text())["patients"]
    clean = [p for p in truth if not p["planted"]]
    # Export clutter around the first clean patient: none of it may exclude anyone.
    folder = None
    for candidate in sorted((out / "dicom").glob("*/*/2_spine")):
        first = sorted(candidate.iterdir())[0]
        if clean[0]["patient_id"].encode() in first.read_bytes()[:3000]:
            folder = candidate
            break
    slices = sorted(folder.iterdir())
    assert folder is not None
    shutil.copyfile(slices[3], folder / "COPY0003")  # exact duplicate, no extension
    raw = slices[5].read_bytes()
    slices[5].write_bytes(raw[132:])  # no preamble, no "DICM"
    (folder / "README.txt").write_text("exported by PACS, do not edit")
    # The second clean patient's mask misses its first fractured level (still in view).
    lost = clean[1]
    mask_path = out / "masks" / f"{lost['patient_id']}.nii.gz"
    img = nib.load(mask_path)
    labels = np.asarray(img.dataobj).copy()
    labels[labels == LEVEL_IDS[lost["fractures"][0]["level"]]] = 0
    nib.save(nib.Nifti1Image(labels, img.affine, img.header), mask_path)
    return out, truth, clean, lost


def _rows(cohort):
    with open(cohort / "clinical.csv", newline="") as fh:
        return list(csv.DictReader(fh))


def test_every_planted_exclusion_is_caught_and_nothing_else(planted, tmp_path):
    cohort, truth, clean, lost = planted
    cache = ingest(cohort, tmp_path / "cache", ROI, tmp_path / "key", num_workers=2, progress=False)
    by_patient = {p["patient_id"]: p for p in truth}
    index = read_index(cache)
    csv_rows = _rows(cohort)
    assert len(index) == len(csv_rows)
    for r, raw in zip(index, csv_rows):
        expected = by_patient[raw["patient_id"]]["planted"].get(raw["level"])
        assert r["reasons"] == ([expected] if expected else []), f"row {r['row']} ({raw['level']}): {r['reasons']} {r['note']}"
    flagged = {raw["level"]: r["flags"] for r, raw in zip(index, csv_rows) if raw["patient_id"] == lost["patient_id"]}
    assert "level_mask_missing" in flagged[lost["fractures"][0]["level"]]

    flow = json.loads((cache / "flow.json").read_text())
    totals = flow["totals"]
    assert [r["row"] for r in flow["rows"]] == list(range(1, len(csv_rows) + 1))
    planted_rows = [by_patient[raw["patient_id"]]["planted"].get(raw["level"]) for raw in csv_rows]
    assert totals["excluded_by_reason"] == {code: planted_rows.count(code) for code in EXCLUSION_CODES}
    assert {p["center"] for p in truth if "implant" in p["planted"].values()} == {"A", "B"}  # one patient per center
    assert totals["files"]["non_dicom"] >= 2  # the export's log file and the README planted here
    assert (cache / "flow.md").read_text().count("implant") >= 1 and (cache / "flow.png").stat().st_size > 10_000
    clutter = [r for r, raw in zip(index, csv_rows) if raw["patient_id"] == clean[0]["patient_id"]]
    assert all(r["included"] for r in clutter)
    assert any("duplicates_dropped" in r["flags"] for r in clutter)


def test_rerun_redoes_only_what_changed_and_keeps_finished_patients(planted, tmp_path, monkeypatch):
    cohort, truth, clean, _ = planted
    copy = tmp_path / "cohort"
    shutil.copytree(cohort, copy)
    n_patients = len(truth)
    # A crash (not an exception ingest may catch) at the 4th patient: the first 3 stay in the cache.
    calls = []
    real_work = ingest_module._work

    def crash_on_fourth(p):
        calls.append(p)
        if len(calls) == 4:
            raise KeyboardInterrupt
        real_work(p)

    monkeypatch.setattr(ingest_module, "_work", crash_on_fourth)
    with pytest.raises(KeyboardInterrupt):
        ingest(copy, tmp_path / "cache", ROI, tmp_path / "key", num_workers=1, progress=False)
    monkeypatch.setattr(ingest_module, "_work", real_work)
    cache = ingest(copy, tmp_path / "cache", ROI, tmp_path / "key", num_workers=1, progress=False)
    files = json.loads((cache / "flow.json").read_text())["totals"]["files"]
    assert files["patients_reused"] == 3 and files["patients_ingested"] == n_patients - 3

    rows = _rows(copy)  # one row changes: only its patient is redone
    target = next(i for i, r in enumerate(rows) if r["patient_id"] == clean[1]["patient_id"])
    rows[target]["age"] = "45"
    with open(copy / "clinical.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    cache = ingest(copy, tmp_path / "cache", ROI, tmp_path / "key", num_workers=1, progress=False)
    files = json.loads((cache / "flow.json").read_text())["totals"]["files"]
    assert files["patients_ingested"] == 1 and files["patients_reused"] == n_patients - 1
    assert read_index(cache)[target]["reasons"] == ["age"]


def test_an_unexpected_error_excludes_one_patient_and_is_retried(planted, tmp_path, monkeypatch):
    cohort, truth, _, _ = planted
    real_work = ingest_module._work
    seen = []

    def fail_second(p):
        seen.append(p)
        if len(seen) == 2:
            raise RuntimeError("disk hiccup")
        real_work(p)

    monkeypatch.setattr(ingest_module, "_work", fail_second)
    index = read_index(ingest(cohort, tmp_path / "cache", ROI, tmp_path / "key", num_workers=1, progress=False))
    victim = seen[1].job["pseudonym"]
    assert all(r["reasons"] == ["unreadable"] and "disk hiccup" in r["note"] for r in index if r["pseudonym"] == victim)
    assert {r["pseudonym"] for r in index if "disk hiccup" in r["note"]} == {victim}
    assert any(r["included"] for r in index), "the other patients ingest"
    monkeypatch.setattr(ingest_module, "_work", real_work)
    # The next run retries the failed patient only, although no file changed.
    cache = ingest(cohort, tmp_path / "cache", ROI, tmp_path / "key", num_workers=1, progress=False)
    assert json.loads((cache / "flow.json").read_text())["totals"]["files"]["patients_ingested"] == 1
