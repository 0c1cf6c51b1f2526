"""Ingest: one sample per included row, cached, robust to a bad patient, no PHI in the cache."""

from __future__ import annotations

import csv
import json
import shutil

import nibabel as nib
import numpy as np
import pytest

from ovcf.contract import DATA_PROBLEM_CODES, EXCLUSION_CODES
from ovcf.data import ct as ct_module
from ovcf.data.ingest import ingest, read_index
from ovcf.data.roi import RoiSpec


@pytest.fixture
def cohort_copy(tiny_cohort, tmp_path):
    dst = tmp_path / "cohort"
    shutil.copytree(tiny_cohort, dst)
    return dst


def _csv_rows(cohort):
    with open(cohort / "clinical.csv", newline="") as fh:
        return list(csv.DictReader(fh))


def test_every_row_becomes_a_sample(tiny_cohort, tmp_path):
    roi = RoiSpec(size=32, spacing=1.5)
    cache = ingest(tiny_cohort, tmp_path / "cache", roi, tmp_path / "key", num_workers=1, progress=False)
    index = read_index(cache)
    rows = _csv_rows(tiny_cohort)
    assert [r["row"] for r in index] == list(range(1, len(rows) + 1))
    assert all(r["included"] for r in index), [r["reasons"] for r in index]
    for r in index:
        sample = np.load(cache / "samples" / f"{r['pseudonym']}.npz")
        image, mask = sample[f"r{r['row']}_image"], sample[f"r{r['row']}_mask"]
        assert image.shape == mask.shape == (32, 32, 32)
        assert mask[16, 16, 16] == 1, "the ROI is centred on the fractured body"
        assert 50 < np.median(image[mask == 1]) < 700  # bone, in HU
        assert image.min() >= -1100


def test_second_run_reads_the_cache_not_dicom(tiny_cohort, tmp_path, monkeypatch):
    first = ingest(tiny_cohort, tmp_path / "cache", RoiSpec(24, 2.0), tmp_path / "key", progress=False)

    def no_dicom(*args, **kwargs):
        raise AssertionError("DICOM decoded although the cache is fresh")

    monkeypatch.setattr(ct_module, "load_series", no_dicom)  # the CT path reads every header and series
    monkeypatch.setattr(ct_module, "read_header", no_dicom)
    assert ingest(tiny_cohort, tmp_path / "cache", RoiSpec(24, 2.0), tmp_path / "key", progress=False) == first


def test_changed_cohort_is_ingested_again(cohort_copy, tmp_path):
    roi = RoiSpec(24, 2.0)
    ingest(cohort_copy, tmp_path / "cache", roi, tmp_path / "key", progress=False)
    rows = _csv_rows(cohort_copy)
    rows[0]["age"] = "45"  # now excluded by the protocol (age < 50)
    with open(cohort_copy / "clinical.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    index = read_index(ingest(cohort_copy, tmp_path / "cache", roi, tmp_path / "key", progress=False))
    assert index[0]["reasons"] == ["age"] and not index[0]["included"]
    assert all(r["included"] for r in index[1:])


def test_one_bad_patient_does_not_stop_the_cohort(cohort_copy, tmp_path):
    rows = _csv_rows(cohort_copy)
    bad = rows[0]["patient_id"]
    (cohort_copy / "masks" / f"{bad}.nii.gz").write_bytes(b"this is not a NIfTI file")
    victim = rows[-1]["patient_id"]
    for f in sorted((cohort_copy / "dicom").glob("*/*/2_spine/*")):  # the thin CT series
        if victim in f.read_bytes()[:2000].decode("latin-1"):
            f.write_bytes(f.read_bytes()[:-1000])  # truncated pixel data
            break
    index = read_index(ingest(cohort_copy, tmp_path / "cache", RoiSpec(24, 2.0), tmp_path / "key", progress=False))
    by_reason = {}
    for r, raw in zip(index, rows):
        by_reason.setdefault(raw["patient_id"], set()).add(";".join(r["reasons"]))
    assert {x for r in index for x in r["reasons"]} <= {*EXCLUSION_CODES, *DATA_PROBLEM_CODES}, "reasons are contract codes"
    assert by_reason[bad] == {"mask_mismatch"}
    assert by_reason[victim] in ({"unreadable"}, {"no_ct"})
    others = [r for r, raw in zip(index, rows) if raw["patient_id"] not in (bad, victim)]
    assert others and all(r["included"] for r in others)


def test_cache_holds_no_patient_identifiers(tiny_cohort, tmp_path):
    cache = ingest(tiny_cohort, tmp_path / "cache", RoiSpec(24, 2.0), tmp_path / "key", progress=False)
    ids = {r["patient_id"] for r in _csv_rows(tiny_cohort)}
    for path in cache.rglob("*"):
        if path.is_file():
            blob = path.read_bytes()
            for pid in ids:
                assert pid.encode() not in blob and pid not in path.name, f"{pid} leaked into {path}"


def test_roi_margin_spans_each_body(tiny_cohort, tmp_path):
    """`margin`: the cube spans the body's largest extent plus the margin on both sides, so its
    spacing follows the body; the body in the cube is then size - 2 margins wide on that axis."""
    size, margin = 32, 6.0
    cache = ingest(tiny_cohort, tmp_path / "cache", RoiSpec(size, 1.5, None, margin), tmp_path / "key", progress=False)
    spacings = []
    for r in read_index(cache):
        record = json.loads((cache / "patients" / f"{r['pseudonym']}.json").read_text())
        qc = next(row["qc"] for row in record["rows"] if row["row"] == r["row"])
        mask = np.load(cache / "samples" / f"{r['pseudonym']}.npz")[f"r{r['row']}_mask"]
        assert mask[size // 2, size // 2, size // 2] == 1, "centred on the body"
        widest = max(np.ptp(np.nonzero(mask)[axis]) + 1 for axis in range(3))  # voxels of the cube
        assert abs(widest - (size - 2 * margin / qc["roi_mm"])) <= 2.0, (widest, qc["roi_mm"])
        spacings.append(qc["roi_mm"])
    assert len(spacings) > 3 and np.ptp(spacings) > 0.01, "the spacing follows each body"
    fixed = ingest(tiny_cohort, tmp_path / "cache", RoiSpec(size, 1.5), tmp_path / "key", progress=False)
    assert fixed != cache  # another cache folder: the margin is part of the ROI's settings


def test_ingest_takes_a_patients_totalsegmentator_folder(cohort_copy, tmp_path):
    """One patient's mask as a folder holding a v2-id label map: the same ROIs as from its VerSe file."""
    roi = RoiSpec(24, 2.0)
    first = ingest(cohort_copy, tmp_path / "a", roi, tmp_path / "key", progress=False)
    before = read_index(first)
    with open(cohort_copy / "clinical.csv", newline="") as fh:
        pid = next(csv.DictReader(fh))["patient_id"]
    verse_file = cohort_copy / "masks" / f"{pid}.nii.gz"
    img = nib.load(verse_file)
    verse = np.asarray(img.dataobj).astype(np.int16)
    v2 = np.where(verse > 0, 51 - verse, 0).astype(np.uint8)
    (cohort_copy / "masks" / pid).mkdir()
    nib.save(nib.Nifti1Image(v2, img.affine), cohort_copy / "masks" / pid / "ct_total.nii.gz")
    verse_file.unlink()
    cache = ingest(cohort_copy, tmp_path / "b", roi, tmp_path / "key", progress=False)
    after = read_index(cache)
    assert [(r["row"], r["included"]) for r in after] == [(r["row"], r["included"]) for r in before]
    name = next(r["pseudonym"] for r in after if r["row"] == 1)
    old = np.load(first / "samples" / f"{name}.npz")
    new = np.load(cache / "samples" / f"{name}.npz")
    rows = [r["row"] for r in after if r["pseudonym"] == name and r["included"]]
    assert rows and all(np.array_equal(old[f"r{k}_mask"], new[f"r{k}_mask"]) for k in rows)
    assert pid not in (cache / "index.csv").read_text()
