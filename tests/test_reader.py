"""The DICOM/NIfTI reader returns the right geometry and HU (checked against SimpleITK)."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from pydicom.data import get_testdata_file

from ovcf.data.dicom import list_files, read_header
from ovcf.data.series import SeriesChecks, ct_candidates, group_series, load_series
from ovcf.data.volume import LPS_TO_RAS, Volume, load_nifti, mask_on_ct, resample_roi
from ovcf.errors import CohortError


def sitk_volume(files: list[str]) -> Volume:
    """SimpleITK's reading of a series, as (x, y, z) array + RAS affine."""
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(files)
    img = reader.Execute()
    aff = np.eye(4)
    aff[:3, :3] = np.array(img.GetDirection()).reshape(3, 3) * np.array(img.GetSpacing())
    aff[:3, 3] = img.GetOrigin()
    return Volume(sitk.GetArrayFromImage(img).transpose(2, 1, 0).astype(np.float32), LPS_TO_RAS @ aff)


def series_of(cohort: Path):
    """The CT series ingest would choose, one per patient (exports also hold scouts and MRI)."""
    headers = [h for path in list_files(cohort / "dicom") for h in read_header(path)[0]]
    by_patient: dict[str, list] = {}
    for s in group_series(headers):
        by_patient.setdefault(s.patient_id, []).append(s)
    return [ct_candidates(series)[0] for series in by_patient.values()]


def test_export_clutter_is_skipped_and_the_thin_ct_chosen(tmp_path):
    """Scout, MRI, a thick second CT, files without extension, a text file: ingest picks the thin CT."""
    from conftest import synthetic_params

    from ovcf.synth.cohort import generate_cohort

    params = synthetic_params(patients_per_center=1, n_levels=[5, 5], export={"thick_ct_fraction": 1.0})
    cohort = generate_cohort(tmp_path / "c", num_workers=2, progress=False, **params)
    kinds = [read_header(p)[1] for p in list_files(cohort / "dicom")]
    assert kinds.count("non_dicom") == 1
    assert any(not Path(p).suffix for p in list_files(cohort / "dicom")), "center B exports files without extension"
    headers = [h for p in list_files(cohort / "dicom") for h in read_header(p)[0]]
    series = group_series(headers)
    found = sorted({(s.modality, s.slices[0].series_number) for s in series})
    assert found == [("CT", "1"), ("CT", "2"), ("CT", "4"), ("MR", "5")]  # scout, thin CT, thick CT, MRI
    for pid in {s.patient_id for s in series}:
        chosen = ct_candidates([s for s in series if s.patient_id == pid])[0]
        assert chosen.slices[0].series_number == "2" and chosen.slices[0].thickness < 5


def test_generated_series_match_simpleitk(tiny_cohort):
    series = series_of(tiny_cohort)
    assert len(series) == 8  # 4 patients x 2 centers, one CT series each
    for s in series:
        ours = load_series(s).canonical()
        files = [h.path for h in sorted(s.slices, key=lambda h: float(pydicom.dcmread(h.path).ImagePositionPatient[2]))]
        ref = sitk_volume(files).canonical()
        assert ours.array.shape == ref.array.shape
        np.testing.assert_allclose(ours.affine, ref.affine, atol=1e-3)
        np.testing.assert_allclose(ours.array, ref.array, atol=0.5)
        first = pydicom.dcmread(s.slices[0].path)
        np.testing.assert_allclose(ours.spacing[:2], [float(v) for v in first.PixelSpacing], atol=1e-4)
        assert ours.spacing[2] == pytest.approx(float(first.SpacingBetweenSlices), abs=1e-3)


def test_both_scanner_profiles_and_slice_orders_are_read(tiny_cohort):
    """Head-first and feet-first exports of both scanners read with the voxel size their headers give
    (each patient's rendering style draws its own slice spacing; the pixel spacing is the center's)."""
    pixel = {}
    for s in series_of(tiny_cohort):
        headers = [pydicom.dcmread(sl.path, stop_before_pixels=True) for sl in s.slices]
        z = sorted(float(h.ImagePositionPatient[2]) for h in headers)
        expected = [*map(float, headers[0].PixelSpacing), float(np.median(np.diff(z)))]
        assert np.round(load_series(s).canonical().spacing, 2).tolist() == np.round(expected, 2).tolist(), s.patient_id
        pixel.setdefault(headers[0].PatientPosition, set()).add(round(float(headers[0].PixelSpacing[0]), 2))
    assert pixel == {"HFS": {0.8}, "FFS": {1.0}}  # center A head-first at 0.8 mm, center B feet-first at 1.0 mm


def test_masks_land_on_vertebral_bodies(tiny_cohort):
    """Masks stored LPS (center A) and RAS (center B) both land on bone after world matching."""
    orientations = set()
    for s in series_of(tiny_cohort):
        ct = load_series(s).canonical()
        path = tiny_cohort / "masks" / f"{s.patient_id}.nii.gz"
        orientations.add(nib.aff2axcodes(nib.load(path).affine))
        labels = mask_on_ct(load_nifti(path), ct, path.name)
        levels = [v for v in np.unique(labels) if v]
        assert len(levels) >= 5
        shift = int(round(40 / ct.spacing[1]))  # 40 mm anterior of a body: soft tissue, not bone
        for level in levels:
            body = ct.array[labels == level]
            anterior = ct.array[np.roll(labels == level, shift, axis=1)]
            ml = (labels == level).sum() * np.prod(ct.spacing) / 1000
            # Cancellous bone (its median) and the cortical shell (its top decile), whatever the style's density
            assert np.median(body) > 60 and np.median(body) > np.median(anterior) + 40, "mask voxels must sit on bone"
            assert np.percentile(body, 90) > np.percentile(anterior, 90) + 250, "the mask holds the cortical shell"
            assert 3 < ml < 60
    assert orientations == {("L", "P", "S"), ("R", "A", "S")}


def test_mask_off_the_ct_grid_is_a_named_error(tiny_cohort):
    s = series_of(tiny_cohort)[0]
    ct = load_series(s)
    mask = load_nifti(tiny_cohort / "masks" / f"{s.patient_id}.nii.gz")
    shifted = Volume(mask.array, mask.affine.copy())
    shifted.affine[0, 3] += 0.5
    with pytest.raises(CohortError, match="does not lie on its CT series' voxels"):
        mask_on_ct(shifted, ct, "p.nii.gz")
    cropped = Volume(mask.array[1:], mask.affine)
    with pytest.raises(CohortError, match="has shape"):
        mask_on_ct(cropped, ct, "p.nii.gz")


def test_pydicom_ct_small_matches_simpleitk():
    path = get_testdata_file("CT_small.dcm")
    headers, kind = read_header(path)
    assert kind == "image"
    series = group_series(headers)
    vol = load_series(series[0], SeriesChecks(min_slices=1))
    ref = sitk_volume([path])
    assert vol.array.shape == (128, 128, 1)
    np.testing.assert_allclose(vol.spacing[:2], [0.661468, 0.661468], atol=1e-6)
    np.testing.assert_allclose(vol.affine[:3, 3], ref.affine[:3, 3], atol=1e-4)
    np.testing.assert_allclose(vol.affine[:3, :2], ref.affine[:3, :2], atol=1e-5)
    np.testing.assert_allclose(vol.array, ref.array, atol=0.5)
    ds = pydicom.dcmread(path)
    hu = ds.pixel_array.astype(float) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    np.testing.assert_allclose(vol.array[:, :, 0], hu.T)


def test_ct_candidates_prefer_named_then_most_slices(tiny_cohort):
    headers = [h for path in list_files(tiny_cohort / "dicom") for h in read_header(path)[0]]
    everything = group_series(headers)
    series = [s for s in everything if s.patient_id == everything[0].patient_id and s.modality == "CT" and not s.is_localizer]
    assert ct_candidates(everything)[0] in everything and ct_candidates(series)[0] is series[0]
    assert ct_candidates(series, "1.2.3.does.not.exist") == []
    assert ct_candidates(series, series[0].series_uid)[0] is series[0]


def test_non_dicom_files_are_skipped(tmp_path):
    (tmp_path / "notes.txt").write_text("not a dicom file")
    (tmp_path / "empty").write_bytes(b"")
    assert read_header(str(tmp_path / "notes.txt")) == ([], "non_dicom")
    assert read_header(str(tmp_path / "empty")) == ([], "non_dicom")


def test_roi_resampling_reads_world_coordinates():
    """A volume whose value is its RAS x coordinate: the ROI must hold the x of its own voxels."""
    affine = np.array([[-0.7, 0, 0, 40.0], [0, 0.9, 0, -20.0], [0, 0, 2.0, 100.0], [0, 0, 0, 1]])
    i = np.arange(60)[:, None, None] * np.ones((60, 40))
    vol = Volume((-0.7 * i + 40.0).astype(np.float32), affine)
    centre = np.array([20.0, 0.0, 130.0])
    roi = resample_roi(vol, centre, 9, 1.5)
    expected_x = centre[0] + (np.arange(9) - 4) * 1.5
    np.testing.assert_allclose(roi[:, 4, 4], expected_x, atol=1e-3)
    np.testing.assert_allclose(roi[4], 20.0, atol=1e-3)  # constant across y and z
    far = resample_roi(vol, np.array([500.0, 0, 0]), 4, 1.0)
    assert np.all(far == -1024.0)  # outside the scan: air


def test_real_ge_ct_with_padding_matches_simpleitk():
    """A real 3-slice GE CT (dcmqi): geometry as SimpleITK reads it; padding (-2000) becomes air."""
    from conftest import REAL

    folder = REAL / "dcmqi" / "ct-3slice"
    if not folder.is_dir():
        pytest.skip(f"real test data not found at {folder} (../shared/data/real beside the project)")
    headers = [h for p in sorted(folder.glob("*.dcm")) for h in read_header(str(p))[0]]
    (series,) = group_series(headers)
    ours = load_series(series)
    ref = sitk_volume(sorted(str(p) for p in folder.glob("*.dcm")))
    assert ours.array.shape == (512, 512, 3)
    np.testing.assert_allclose(ours.spacing, [0.810547, 0.810547, 1.0], atol=1e-5)
    ours_c, ref_c = ours.canonical(), ref.canonical()
    np.testing.assert_allclose(ours_c.affine, ref_c.affine, atol=1e-3)
    padded = ref_c.array <= -3000  # stored -2000 with intercept -1024
    assert padded.sum() > 1000
    assert np.all(ours_c.array[padded] == -1024.0)
    np.testing.assert_allclose(ours_c.array[~padded], ref_c.array[~padded], atol=0.5)


def test_pir_float_mask_matches_through_world_coordinates(tiny_cohort):
    """A mask stored PIR as float64 (as VerSe ships them) lands on the same CT voxels as the original."""
    s = series_of(tiny_cohort)[0]
    ct = load_series(s)
    path = tiny_cohort / "masks" / f"{s.patient_id}.nii.gz"
    img = nib.load(path)
    pir = img.as_reoriented(nib.orientations.ornt_transform(nib.io_orientation(img.affine), nib.orientations.axcodes2ornt("PIR")))
    assert nib.aff2axcodes(pir.affine) == ("P", "I", "R")
    as_float = Volume(np.asarray(pir.dataobj).astype(np.float64), pir.affine)
    np.testing.assert_array_equal(mask_on_ct(as_float, ct, "pir"), mask_on_ct(load_nifti(path), ct, "orig"))


def test_real_verse_mask_reads_as_integer_labels():
    """The real VerSe mask (PIR, float64): canonical RAS, whole-number VerSe ids T9..L5."""
    from conftest import REAL

    path = REAL / "verse" / "sub-verse004_seg-vert_msk.nii.gz"
    if not path.is_file():
        pytest.skip(f"real test data not found at {path} (../shared/data/real beside the project)")
    mask = load_nifti(path)
    assert nib.aff2axcodes(mask.affine) == ("P", "I", "R")
    ct_like = Volume(np.zeros(mask.canonical().array.shape, np.float32), mask.canonical().affine)  # a CT on its grid
    labels = mask_on_ct(mask, ct_like, path.name)
    assert set(np.unique(labels)) - {0} == set(range(16, 25))
