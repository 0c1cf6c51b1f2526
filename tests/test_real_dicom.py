"""The reader on real files (../shared/data/real): SimpleITK's geometry and HU, or a named rejection.

Every file there is read alone; a CT that loads must match SimpleITK's reading of it (origin,
in-plane axes and spacing, HU), and a file that cannot become a volume must be rejected with the
reason listed in REJECTED. Series folders are checked as series below. Nothing may crash.
"""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
from conftest import REAL

from ovcf.data.dicom import list_files, read_header
from ovcf.data.series import SERIES_PROBLEMS, SeriesChecks, SeriesError, group_series, load_series, validate
from ovcf.data.volume import LPS_TO_RAS, Volume, load_nifti, mask_on_ct

pytestmark = pytest.mark.skipif(not REAL.is_dir(), reason=f"real test files not found at {REAL} (../shared/data/real)")

SKIP_SUFFIXES = (".nii.gz", ".nrrd", ".json", ".md", ".txt", ".csv", ".py")
# File kinds that are not images: counted and skipped by the scan.
NOT_IMAGES = {
    "DICOMDIR": "dicomdir",
    "no-pixel-data.dcm": "no_pixels",
    "GH178.dcm": "unreadable",  # Secondary Capture images without their pixel data
    "GH179A.dcm": "unreadable",
    "GH179B.dcm": "unreadable",
    "empty_charset_LEI.dcm": "non_dicom",
    "no_meta_group_length.dcm": "unreadable",  # an RT Image without its pixel data
    "meta_missing_tsyntax.dcm": "unreadable",  # a Part 10 file whose meta lacks its transfer syntax
    "no_meta.dcm": "non_dicom",
    "LICENSE": "non_dicom",
}
# Images that must be rejected, by file name (prefix), with their reason.
REJECTED = {
    "CTImage.dcm_JPEGProcess1TransferSyntax": "lossy_8bit",
    "CTImage.dcm_JPEGProcess10_12TransferSyntax": "unsupported_transfer_syntax",
    "CTImage.dcm_JPEGProcess6_8TransferSyntax": "unsupported_transfer_syntax",
    "CT-MONO2-16-ankle": "missing_geometry",
    "FreezePattern.dcm": "not_grayscale",
    "GH1376.dcm": "truncated",
    "MR_truncated.dcm": "truncated",
    "TOSHIBA_J2K_SIZ1_PixRep0.dcm": "implausible_hu",
    "JPEG-lossy.dcm": "missing_geometry",  # NM: no patient geometry
    "emri_small_jpeg_2k_lossless_too_short.dcm": "missing_geometry",  # MR without position tags
}
ONE_SLICE = SeriesChecks(min_slices=1)


def _files() -> list:
    if not REAL.is_dir():
        return []
    return [p for p in map(str, sorted(REAL.rglob("*"))) if not p.endswith(SKIP_SUFFIXES) and REAL.joinpath(p).is_file()]


def _expected(name: str) -> str:
    for table in (NOT_IMAGES, REJECTED):
        for prefix, code in table.items():
            if name.startswith(prefix):
                return code
    return "load"


def sitk_volume(image) -> Volume:
    aff = np.eye(4)
    aff[:3, :3] = np.array(image.GetDirection()).reshape(3, 3) * np.array(image.GetSpacing())
    aff[:3, 3] = image.GetOrigin()
    return Volume(sitk.GetArrayFromImage(image).transpose(2, 1, 0).astype(np.float32), LPS_TO_RAS @ aff)


def _outcome(path: str):
    headers, kind = read_header(path)
    if kind != "image":
        return kind, None, None
    (series,) = group_series(headers)
    try:
        return "load", load_series(series, ONE_SLICE), series
    except SeriesError as exc:
        assert exc.code in SERIES_PROBLEMS
        return exc.code, None, series


@pytest.mark.parametrize("path", _files(), ids=lambda p: p.split("/real/")[-1])
def test_real_file_loads_like_simpleitk_or_is_rejected_by_name(path):
    name = path.rsplit("/", 1)[-1]
    outcome, volume, series = _outcome(path)
    expected = _expected(name)
    if series is not None and series.modality != "CT" and expected == "load":
        return  # MR, CR, NM ...: only "no crash" is asked of non-CT images
    assert outcome == expected, f"{name}: {outcome}, expected {expected}"
    if volume is None:
        return
    ref = sitk_volume(sitk.ReadImage(path))
    ours = volume
    if ours.array.shape[2] == 1:  # one slice: SimpleITK's slice axis comes from its own guess
        np.testing.assert_allclose(ours.affine[:3, 3], ref.affine[:3, 3], atol=1e-3)
        np.testing.assert_allclose(ours.affine[:3, :2], ref.affine[:3, :2], atol=1e-4)
        a, b = ours.array, ref.array
    else:  # multi-frame: compare in canonical orientation
        ours, ref = ours.canonical(), ref.canonical()
        np.testing.assert_allclose(ours.affine, ref.affine, atol=1e-3)
        a, b = ours.array, ref.array
    assert a.shape == b.shape
    keep = a != -1024.0  # pixel padding: air for us, the raw padding value for SimpleITK
    lossy = any(note.startswith("lossy_compression") for note in series.notes)
    one_unit = abs(series.slices[0].rescale[0])  # lossy decoders may differ by one stored value
    assert np.abs(a[keep] - b[keep]).max() <= 0.5 + (one_unit * 1.01 if lossy else 0.0), name


def test_fast_header_walker_agrees_with_pydicom(tiny_cohort):
    """Every file the fast walker takes yields the same slice headers as pydicom's full parse."""
    from ovcf.data.dicom import _parse, _slices
    from ovcf.data.rawdicom import read_raw_header

    paths = _files() + list_files(tiny_cohort / "dicom")[:50]
    taken = 0
    for path in paths:
        data = open(path, "rb").read()
        raw = read_raw_header(data)
        if raw is None:
            continue
        taken += 1
        ds, pos = _parse(data)
        assert _slices(raw[0], path, "d", data, raw[1]) == _slices(ds, path, "d", data, pos), path
    assert taken > 100


def _series(folder: str):
    headers = [h for p in list_files(REAL / folder) for h in read_header(p)[0]]
    return group_series(headers)


def _reject_code(folder: str, checks: SeriesChecks = SeriesChecks()) -> str:
    (series,) = _series(folder)
    with pytest.raises(SeriesError) as info:
        load_series(series, checks)
    return info.value.code


def test_series_with_empty_uids_loads_and_its_mask_fits():
    """TotalSegmentator's PET/CT export: J2K, empty Series/SOP UIDs, no extension; its mask lies on it."""
    folder = "totalsegmentator/tests/reference_files/example_ct_dicom"
    (series,) = _series(folder)
    ours = load_series(series)
    assert ours.array.shape == (512, 512, 20)
    np.testing.assert_allclose(ours.spacing, [0.9765625, 0.9765625, 2.0], atol=1e-4)
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(REAL / folder)))
    ref = sitk_volume(reader.Execute())
    np.testing.assert_allclose(ours.canonical().affine, ref.canonical().affine, atol=1e-3)
    np.testing.assert_allclose(ours.canonical().array, ref.canonical().array, atol=0.5)
    labels = mask_on_ct(load_nifti(REAL / "totalsegmentator/tests/reference_files/example_seg_dicom.nii.gz"), ours, "seg")
    assert {32, 33} <= set(np.unique(labels))  # T12 and T11 on the CT's own voxels
    assert np.median(ours.canonical().array[labels == 32]) > 100  # on bone


def test_tiny_dicomdir_ct_series_loads():
    (series,) = _series("pydicom-test-files/dicomdirtests/98892001/CT5N")
    assert load_series(series).array.shape == (16, 16, 5)


def test_slice_gaps_are_named():
    assert _reject_code("monai/CT_DICOM") in ("missing_slices", "uneven_spacing")
    assert _reject_code("dicom2nifti/failing/sliceincrement/001") == "missing_slices"
    assert _reject_code("dicom2nifti/failing/sliceincrement/002") == "missing_slices"


def test_slices_at_one_position_are_not_a_volume():
    assert _reject_code("dicom2nifti/failing/notavolume") == "duplicate_positions"


def test_gantry_tilt_is_rejected_or_kept_with_its_true_geometry():
    folder = "dicom2nifti/failing/gantrytilting"
    assert _reject_code(folder, SeriesChecks(correct_tilt=False)) == "gantry_tilt"
    (series,) = _series(folder)
    ordered, _ = validate(series)
    volume = load_series(series)  # sheared affine: every voxel centre where DICOM puts it
    assert any(n.startswith("gantry_tilt") for n in series.notes)
    for k, s in enumerate(ordered):
        corner = volume.affine @ np.array([0, 0, k, 1.0])
        np.testing.assert_allclose(corner[:3], LPS_TO_RAS[:3, :3] @ np.array(s.position), atol=1e-3)


def test_mixed_orientations_are_split():
    parts = _series("fo-dicom/abd1_tri_planar_localizer_MR")
    assert sorted(len(s.slices) for s in parts) == [3, 3, 5]
    assert all(any(n.startswith("mixed_orientation") for n in s.notes) for s in parts)
    assert len(_series("pydicom-test-files/dicomdirtests/98892001/CT2N")) == 2


def test_whole_folder_scan_never_crashes():
    """The real folder as one export: every file is classified, every series loads or is named."""
    counts: dict[str, int] = {}
    headers = []
    for path in list_files(REAL):
        found, kind = read_header(path)
        counts[kind] = counts.get(kind, 0) + 1
        headers.extend(found)
    outcomes: dict[str, int] = {}
    for series in group_series(headers):
        try:
            load_series(series, ONE_SLICE)
            code = "load"
        except SeriesError as exc:
            code = exc.code
        outcomes[code] = outcomes.get(code, 0) + 1
    assert counts["image"] > 100 and counts["dicomdir"] == 7
    assert outcomes["load"] > 20 and set(outcomes) <= {"load", *SERIES_PROBLEMS}


def test_ct_based_checks_on_real_anatomy():
    """TotalSegmentator's real abdomen CT (no implants, normal dose) with its vertebral-body labels:
    no implant or noise exclusion; a level removed from the mask is re-found near its true centre,
    and a level far above the scan is out of view."""
    from ovcf.data.quality import QualityChecks, implant_ml, level_voxels, locate_level, noise_hu

    ref = REAL / "totalsegmentator/tests/reference_files"
    ct = load_nifti(ref / "example_ct.nii.gz")
    labels = mask_on_ct(load_nifti(ref / "spine_report/test_result/totalseg_vertebrae_pp_refined.nii.gz"), ct, "seg")
    ct = ct.canonical()
    q = QualityChecks()
    by_id = level_voxels(labels)
    assert set(by_id) >= {19, 20, 21, 22, 23, 24}  # T12 .. L5
    for level in ("T12", "L1", "L2", "L3", "L4", "L5"):
        voxels, centre = locate_level(by_id, ct, level)
        assert implant_ml(ct, voxels, q) < q.implant_min_ml, level
        assert 0 < noise_hu(ct, voxels, q) < q.max_noise_hu, level
    truth = ct.world(by_id[21].mean(0))  # L2
    without = {k: v for k, v in by_id.items() if k != 21}
    voxels, estimate = locate_level(without, ct, "L2")
    assert voxels is None and np.linalg.norm(estimate - truth) < 12.0
    assert locate_level(by_id, ct, "T5") == (None, None)
