"""One bad file never stops the cohort, and each is counted under the right reason.

Broken links (dangling, looping) are skipped and counted; a DICOM file whose header is damaged
is counted as unreadable, and the series it leaves with a gap says so; a mask without VerSe level
ids is a mask problem, not a level outside the field of view.
"""

from __future__ import annotations

import json
import os
import random
import shutil

import nibabel as nib
import numpy as np
import pytest
from conftest import synthetic_params

from ovcf.data.ct import check_level, choose_ct, scan_folder
from ovcf.data.dicom import list_files
from ovcf.data.ingest import ingest, read_index
from ovcf.data.quality import QualityChecks, level_voxels
from ovcf.data.roi import RoiSpec
from ovcf.data.series import SeriesChecks
from ovcf.data.volume import Volume, load_nifti

ROI = RoiSpec(24, 2.0)


@pytest.fixture(scope="module")
def small_cohort(tmp_path_factory):
    """One patient per center, the thin CT only (no scout, MRI or thick recon): a few seconds."""
    from ovcf.synth.cohort import generate_cohort

    export = {"localizer": False, "mr_series": False, "thick_ct_fraction": 0.0, "extensions": [".dcm"]}
    params = synthetic_params(patients_per_center=1, n_levels=[5, 5], export=export)
    return generate_cohort(tmp_path_factory.mktemp("small"), num_workers=1, progress=False, report=False, **params)


def _copy(cohort, tmp_path):
    dst = tmp_path / "cohort"
    shutil.copytree(cohort, dst, symlinks=True)
    return dst


def test_broken_links_are_skipped_and_loops_not_followed(tmp_path):
    root, outside = tmp_path / "dicom", tmp_path / "outside"
    (root / "a").mkdir(parents=True)
    outside.mkdir()
    (root / "a" / "slice1").write_bytes(b"one")
    (outside / "slice2").write_bytes(b"two")
    (outside / "linked_folder").mkdir()
    (outside / "linked_folder" / "slice3").write_bytes(b"three")
    (root / "a" / "dangling").symlink_to(tmp_path / "gone")
    (root / "a" / "itself").symlink_to(root / "a" / "itself")
    (root / "a" / "up").symlink_to("..")  # a loop back into the export
    (root / "a" / "top").symlink_to("/")  # an ancestor of everything
    (root / "a" / "file_link").symlink_to(outside / "slice2")  # a good file elsewhere: read
    (root / "folder_link").symlink_to(outside / "linked_folder")  # a folder elsewhere: walked
    (root / "a" / "again").symlink_to(outside / "linked_folder")  # ... once
    os.mkfifo(root / "a" / "pipe")  # reading it would block forever

    assert list_files(root) == [str(root / "a" / "file_link"), str(root / "a" / "slice1"), str(root / "folder_link" / "slice3")]
    kinds = scan_folder(root, progress=False).kinds
    assert kinds["broken_link"] == 4 and kinds["non_dicom"] == 4  # three files and the pipe


def test_ingest_goes_on_past_broken_links(small_cohort, tmp_path, capsys):
    cohort = _copy(small_cohort, tmp_path)
    folder = cohort / "dicom" / sorted(os.listdir(cohort / "dicom"))[0]
    (folder / "dangling.dcm").symlink_to(tmp_path / "gone")
    (folder / "itself").symlink_to(folder / "itself")
    (folder / "loop").symlink_to("..")
    (cohort / "masks" / "ghost.nii.gz").symlink_to(tmp_path / "gone.nii.gz")

    cache = ingest(cohort, tmp_path / "cache", ROI, tmp_path / "key", progress=False)
    index = read_index(cache)
    assert index and all(r["included"] for r in index), [(r["reasons"], r["note"]) for r in index]
    files = json.loads((cache / "flow.json").read_text())["totals"]["files"]
    assert files["broken_link"] == 4
    assert "| broken_link | 4 |" in (cache / "flow.md").read_text()
    written = [p.read_text() for p in cache.rglob("*") if p.suffix in (".json", ".md", ".csv")]
    assert not [text for text in [*written, *capsys.readouterr()] if str(tmp_path) in text], "an export path leaked"


@pytest.mark.parametrize("damage", ["garbage_after_preamble", "zeros_after_preamble", "truncated_header", "garbage_in_header"])
def test_a_slice_with_a_damaged_header_is_unreadable_not_a_gap(small_cohort, tmp_path, damage):
    folder = tmp_path / "series"
    shutil.copytree(sorted(small_cohort.glob("dicom/*/*/2_spine"))[0], folder)  # one CT series
    victim = sorted(folder.iterdir())[40]
    data = victim.read_bytes()
    noise = bytes(random.Random(0).randrange(256) for _ in range(200))
    victim.write_bytes(
        {
            "garbage_after_preamble": data[:132] + noise + data[332:],
            "zeros_after_preamble": data[:132] + bytes(200) + data[332:],
            "truncated_header": data[:700],
            "garbage_in_header": data[:500] + noise[:64] + data[564:],
        }[damage]
    )
    scan = scan_folder(folder, progress=False)
    assert scan.kinds["unreadable"] == 1 and scan.kinds["non_dicom"] == scan.kinds["no_pixels"] == 0, scan.kinds
    choice = choose_ct(scan.series, SeriesChecks())
    assert choice.reason == "unreadable"
    assert [s["status"] for s in choice.report] == ["unreadable_files"], choice.report
    assert "cannot be read" in choice.message and str(tmp_path) not in choice.message


def _spine(ids: dict[int, int]) -> tuple[Volume, dict]:
    """A 40 x 40 x 80 CT of soft tissue at 1.5 mm and a mask with one 9-slice body per label (label: first slice)."""
    volume = Volume(np.zeros((40, 40, 80), np.float32), np.diag([1.5, 1.5, 1.5, 1.0]))
    labels = np.zeros(volume.array.shape, np.int16)
    for label, z in ids.items():
        labels[14:26, 14:26, z : z + 9] = label
    return volume, level_voxels(labels)


@pytest.mark.parametrize(
    "ids, words",
    [
        ({}, "empty"),
        ({100: 50, 101: 35, 102: 20}, "100, 101, 102"),  # bodies numbered from 100
        ({26: 50, 27: 35}, "26, 27"),  # sacrum and coccyx ids, no level
        ({20: 50, 21: 35, 44: 20}, "44"),  # another tool's numbering mixed in
    ],
)
def test_a_mask_without_verse_level_ids_is_a_mask_mismatch(ids, words):
    volume, by_id = _spine(ids)
    check = check_level(volume, by_id, "L1", QualityChecks())
    assert check.reasons == ["mask_mismatch"] and check.centre is None
    assert words in check.notes[0] and "VerSe" in check.notes[0]


def test_a_valid_mask_that_stops_short_of_the_level_is_still_out_of_view():
    volume, by_id = _spine({8: 60, 9: 45})  # T1, T2: L5 lies far below the scan
    assert check_level(volume, by_id, "L5", QualityChecks()).reasons == ["level_not_in_fov"]
    volume, by_id = _spine({20: 50, 21: 35, 26: 10})  # L1, L2 and the sacrum
    assert check_level(volume, by_id, "L1", QualityChecks()).reasons == []


def test_a_real_mask_in_another_tools_numbering_is_a_mask_mismatch():
    """TotalSegmentator numbers the vertebrae 26..33 (its 28 is L4, VerSe's 28 is T13)."""
    from conftest import REAL

    path = REAL / "totalsegmentator/tests/reference_files/spine_report/test_result/totalseg.nii.gz"
    if not path.is_file():
        pytest.skip(f"real test data not found at {path} (../shared/data/real beside the project)")
    mask = load_nifti(path).canonical()
    ct = Volume(np.zeros(mask.array.shape, np.float32), mask.affine)  # a CT on the mask's grid
    check = check_level(ct, level_voxels(mask.array), "T13", QualityChecks())
    assert check.reasons == ["mask_mismatch"] and "29, 30, 31, 32, 33" in check.notes[0]


def test_ingest_names_a_relabelled_mask_a_mask_mismatch(small_cohort, tmp_path):
    cohort = _copy(small_cohort, tmp_path)
    path = sorted((cohort / "masks").iterdir())[0]
    img = nib.load(path)
    labels = np.asarray(img.dataobj).astype(np.int16)
    labels[labels > 0] += 80
    nib.save(nib.Nifti1Image(labels, img.affine), path)

    index = read_index(ingest(cohort, tmp_path / "cache", ROI, tmp_path / "key", progress=False))
    bad = [r for r in index if not r["included"]]
    assert bad and all(r["reasons"] == ["mask_mismatch"] and "VerSe" in r["note"] for r in bad), bad
    assert len(bad) < len(index), "the other patient ingests"


def test_a_patients_mask_that_is_a_broken_link_is_a_mask_mismatch(small_cohort, tmp_path):
    """Not `no_mask` (which would send the user to ovcf.segment), and the other patient still ingests."""
    cohort = _copy(small_cohort, tmp_path)
    victim = sorted((cohort / "masks").glob("*.nii.gz"))[0]
    victim.unlink()
    victim.symlink_to(tmp_path / "gone.nii.gz")
    index = read_index(ingest(cohort, tmp_path / "cache", ROI, tmp_path / "key", progress=False))
    bad = [r for r in index if not r["included"]]
    assert bad and all(r["reasons"] == ["mask_mismatch"] and "broken link" in r["note"] for r in bad)
    assert any(r["included"] for r in index)
