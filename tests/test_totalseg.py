"""TotalSegmentator's outputs as masks: whole vertebrae become bodies with VerSe ids (ingest: tests/test_ingest.py)."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
from conftest import EXAMPLE_BODIES, EXAMPLE_CT, TOTALSEG

from ovcf.contract import LEVEL_IDS
from ovcf.data.totalseg import read_totalseg
from ovcf.data.volume import load_nifti, mask_on_ct
from ovcf.errors import CohortError

REPORT = TOTALSEG / "spine_report" / "test_result"
needs_real = pytest.mark.skipif(not (REPORT / "totalseg.nii.gz").exists(), reason="real CT not in ../shared/data/real")


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2 * float((a & b).sum()) / max(float(a.sum() + b.sum()), 1.0)


def link(folder, *files, body=None):
    """A folder of links to `files` (and to `body` as `vertebrae_body.nii.gz`, the name TotalSegmentator gives it)."""
    folder.mkdir(parents=True, exist_ok=True)
    for f in files:
        (folder / f.name).symlink_to(f)
    if body is not None:
        (folder / "vertebrae_body.nii.gz").symlink_to(body)
    return folder


@needs_real
def test_whole_vertebrae_of_a_real_ct_become_its_bodies(tmp_path):
    """example_ct's multilabel output (v2 ids, whole vertebrae) against TotalSegmentator's refined T12-L5 bodies."""
    ct = load_nifti(EXAMPLE_CT)
    truth = mask_on_ct(load_nifti(EXAMPLE_BODIES), ct, "reference")
    whole = np.rint(load_nifti(REPORT / "totalseg.nii.gz").array).astype(int)
    cut = mask_on_ct(read_totalseg(link(tmp_path / "cut", REPORT / "totalseg.nii.gz")), ct, "cut")
    body = mask_on_ct(
        read_totalseg(link(tmp_path / "body", REPORT / "totalseg.nii.gz", body=REPORT / "totalseg_vertebrae_body.nii.gz")),
        ct,
        "b",
    )
    for level in ("T12", "L1", "L2", "L3", "L4", "L5"):
        v = LEVEL_IDS[level]
        assert dice(whole == 51 - v, truth == v) < 0.78  # the whole vertebra is not the body ...
        assert dice(cut == v, truth == v) >= 0.85, level  # ... the part in front of the canal is
        assert dice(body == v, truth == v) >= 0.87, level  # as is its vertebrae_body part
    # S1 and the sacrum are not levels; of T11 only its arch is in view, so it has no body here.
    assert set(np.unique(cut)) == {0, *(LEVEL_IDS[lv] for lv in ("T12", "L1", "L2", "L3", "L4", "L5"))}


@needs_real
def test_per_structure_files_read_as_the_multilabel_file(tmp_path):
    """TotalSegmentator's default output (one file per structure) and its --ml label map give the same bodies."""
    multi = nib.load(REPORT / "totalseg.nii.gz")
    v2 = np.asarray(multi.dataobj)
    folder = tmp_path / "per_structure"
    folder.mkdir()
    for level in ("T11", "T12", "L1", "L2", "L3", "L4", "L5"):
        part = (v2 == 51 - LEVEL_IDS[level]).astype(np.uint8)
        nib.save(nib.Nifti1Image(part, multi.affine), folder / f"vertebrae_{level}.nii.gz")
    nib.save(nib.Nifti1Image((v2 == 25).astype(np.uint8), multi.affine), folder / "sacrum.nii.gz")  # not a level
    nib.save(nib.Nifti1Image(np.zeros_like(v2), multi.affine), folder / "liver.nii.gz")
    ours = read_totalseg(folder)
    theirs = read_totalseg(link(tmp_path / "multi", REPORT / "totalseg.nii.gz"))
    assert np.array_equal(ours.canonical().array, theirs.canonical().array)
    # The real per-structure output of example_ct_sm: each body smaller than its vertebra.
    fast = TOTALSEG / "example_seg_fast"
    bodies = read_totalseg(fast).canonical()
    assert set(np.unique(bodies.array)) == {0, *(LEVEL_IDS[lv] for lv in ("T12", "L1", "L2"))}  # T11: its arch only
    l1 = load_nifti(fast / "vertebrae_L1.nii.gz").canonical().array > 0
    assert 0.3 < (bodies.array == LEVEL_IDS["L1"]).sum() / l1.sum() < 0.8


def test_a_folder_without_vertebrae_or_with_files_off_the_grid_is_refused(tmp_path):
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CohortError, match="holds 0 label maps"):
        read_totalseg(empty)
    two = tmp_path / "two"
    two.mkdir()
    for name in ("a.nii.gz", "b.nii.gz"):
        nib.save(nib.Nifti1Image(np.zeros((4, 4, 4), np.uint8), affine), two / name)
    with pytest.raises(CohortError, match="holds 2 label maps"):
        read_totalseg(two)
    off = tmp_path / "off"
    off.mkdir()
    nib.save(nib.Nifti1Image(np.ones((4, 4, 4), np.uint8), affine), off / "vertebrae_L1.nii.gz")
    nib.save(nib.Nifti1Image(np.ones((4, 4, 5), np.uint8), affine), off / "vertebrae_L2.nii.gz")
    with pytest.raises(CohortError, match="vertebrae_L2.nii.gz does not lie on the grid"):
        read_totalseg(off)
