"""Fuzz and property tests of the DICOM reader: broken files and odd geometry never crash it.

`read_header` must sort any file content into one of `FILE_KINDS` without raising, and series
assembly (`group_series` -> `load_series`) may fail only with a `SeriesError` naming a problem of
`SERIES_PROBLEMS`; a volume it does return has a finite affine whose slice axis runs along
increasing position on the slice normal, whatever the file order or InstanceNumber.
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, currently_in_test_context, event, given, settings
from hypothesis import strategies as st
from pydicom.data import get_testdata_file
from pydicom.datadict import tag_for_keyword
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.tag import Tag
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, RLELossless, generate_uid

from ovcf.data.dicom import FILE_KINDS, read_header
from ovcf.data.series import SERIES_PROBLEMS, SeriesChecks, SeriesError, group_series, load_series
from ovcf.data.volume import LPS_TO_RAS, Volume

CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"
AXIAL = ("1", "0", "0", "0", "1", "0")
INTERCEPT = -1024.0
FUZZ = dict(deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


def ct_slice(
    pixels: np.ndarray,
    *,
    position=("0", "0", "0"),
    orientation=AXIAL,
    spacing=("0.8", "0.8"),
    series_uid: str = "1.2.3.4",
    study_uid: str = "1.2.3",
    instance: int = 1,
    syntax: str = ExplicitVRLittleEndian,
) -> Dataset:
    """A CT slice with full geometry; a geometry argument of None leaves its tag out."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CT_IMAGE
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian if syntax == RLELossless else syntax
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = CT_IMAGE, meta.MediaStorageSOPInstanceUID
    ds.PatientID, ds.StudyInstanceUID, ds.SeriesInstanceUID = "FUZZ01", study_uid, series_uid
    ds.FrameOfReferenceUID = "1.2.3.9"
    ds.Modality, ds.SeriesNumber, ds.InstanceNumber = "CT", 2, instance
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.StudyDate = "20240101"
    for keyword, value in (
        ("ImagePositionPatient", position),
        ("ImageOrientationPatient", orientation),
        ("PixelSpacing", spacing),
    ):
        if value is not None:  # raw bytes: pydicom would refuse to store 'abc' or 'nan' as a DS
            tag = Tag(tag_for_keyword(keyword))
            text = "\\".join(value).encode()
            text += b" " * (len(text) % 2)
            ds[tag] = RawDataElement(tag, "DS", len(text), text, 0, syntax == ImplicitVRLittleEndian, True)
    ds.SliceThickness = "1.0"
    ds.RescaleSlope, ds.RescaleIntercept = "1", str(INTERCEPT)
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.Rows, ds.Columns = pixels.shape
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.PixelData = pixels.astype("<u2").tobytes()
    if syntax == RLELossless:
        ds.compress(RLELossless)
    return ds


def save(ds: Dataset, path: Path) -> str:
    ds.save_as(path, enforce_file_format=True)
    return str(path)


@pytest.fixture(scope="module")
def seeds(tmp_path_factory) -> dict[str, bytes]:
    """Valid files to mutate: explicit and implicit VR, RLE, and pydicom's CT_small."""
    root = tmp_path_factory.mktemp("seeds")
    pixels = np.arange(256, dtype=np.uint16).reshape(16, 16) + 900
    geometry = dict(position=("-20.5", "-30", "112.25"), spacing=("0.7", "0.9"))
    out = {
        "explicit": Path(save(ct_slice(pixels, **geometry), root / "explicit.dcm")).read_bytes(),
        "implicit": Path(save(ct_slice(pixels, syntax=ImplicitVRLittleEndian, **geometry), root / "implicit.dcm")).read_bytes(),
        "ct_small": Path(get_testdata_file("CT_small.dcm")).read_bytes(),
    }
    try:
        out["rle"] = Path(save(ct_slice(pixels, syntax=RLELossless, **geometry), root / "rle.dcm")).read_bytes()
    except (RuntimeError, NotImplementedError, ValueError):  # no RLE encoder installed
        pass
    for name, data in out.items():  # the seeds themselves are good images
        path = root / f"check_{name}"
        path.write_bytes(data)
        slices, kind = read_header(str(path))
        assert kind == "image" and len(slices) == 1, name
        load_series(group_series(slices)[0], SeriesChecks(min_slices=1))
    return out


def lps_of(volume: Volume) -> np.ndarray:
    return LPS_TO_RAS @ volume.affine  # LPS_TO_RAS is its own inverse


def check_file(path: Path) -> tuple[list, str]:
    """`read_header` returns a kind of `FILE_KINDS` and never raises; slices only for images."""
    result = read_header(str(path))
    assert isinstance(result, tuple) and len(result) == 2
    slices, kind = result
    assert isinstance(slices, list) and isinstance(kind, str) and kind in FILE_KINDS
    assert kind == "image" or slices == []
    return slices, kind


def load_or_reject(series, checks: SeriesChecks) -> Volume | None:
    """The volume, or None for a `SeriesError` with a known code; any other exception fails the test."""
    try:
        volume = load_series(series, checks)
    except SeriesError as exc:
        assert exc.code in SERIES_PROBLEMS, exc.code
        if currently_in_test_context():
            event(f"SeriesError {exc.code}")
        return None
    assert isinstance(volume, Volume)
    if currently_in_test_context():
        event("volume")
    assert volume.array.ndim == 3 and volume.array.dtype == np.float32 and min(volume.array.shape) >= 1
    assert volume.affine.shape == (4, 4)
    return volume


# ------------------------------------------------------------------------------------------------
# 1. mutated bytes

SPECIAL_BYTES = st.sampled_from(
    [b"\x00", b"\xff", b"\xff\xff\xff\xff", b"\x00\x00\x00\x00", b"\xfe\xff\x00\xe0", b"\\", b"OB", b"UN"]
)
RUN = st.one_of(st.binary(min_size=1, max_size=24), SPECIAL_BYTES)


@st.composite
def mutated(draw, data: bytes) -> bytes:
    """`data` after 1-4 of: byte flips, truncation, inserted or deleted runs, overwritten spans."""
    out = bytearray(data)
    for _ in range(draw(st.integers(1, 4))):
        # half the edits hit the first 1 KiB: preamble, file meta and the header tags
        pos = draw(st.one_of(st.integers(0, min(len(out), 1024)), st.integers(0, len(out))))
        op = draw(st.sampled_from(["flip", "flip", "overwrite", "overwrite", "insert", "delete", "truncate"]))
        if op == "flip" and pos < len(out):
            out[pos] ^= draw(st.integers(1, 255))
        elif op == "truncate":
            del out[pos:]
        elif op == "insert":
            out[pos:pos] = draw(RUN)
        elif op == "delete":
            del out[pos : pos + draw(st.integers(1, 64))]
        elif op == "overwrite":
            run = draw(RUN)
            out[pos : pos + len(run)] = run
    return bytes(out)


@settings(max_examples=300, **FUZZ)
@given(data=st.data())
def test_mutated_files_never_crash_the_reader(seeds, tmp_path, data):
    name = data.draw(st.sampled_from(sorted(seeds)), label="seed")
    path = tmp_path / "mutated.dcm"
    path.write_bytes(data.draw(mutated(seeds[name]), label="bytes"))
    slices, kind = check_file(path)
    event(f"kind {kind}")
    for series in group_series(slices):
        volume = load_or_reject(series, SeriesChecks(min_slices=1))
        if volume is None:
            continue
        assert volume.array.shape[2] == len(series.slices)
        assert np.all(np.isfinite(volume.affine)), volume.affine


def test_single_slice_series_has_a_finite_affine(seeds, tmp_path):
    """With min_slices=1 a lone slice is a volume; its slice axis is the normal times SliceThickness."""
    path = tmp_path / "one.dcm"
    path.write_bytes(seeds["explicit"])
    series = group_series(read_header(str(path))[0])[0]
    volume = load_or_reject(series, SeriesChecks(min_slices=1))
    assert volume is not None and np.all(np.isfinite(volume.affine))
    np.testing.assert_allclose(lps_of(volume)[:3, :3], np.diag([0.9, 0.7, 1.0]), atol=1e-9)


def test_rle_decoder_panic_is_a_series_error(seeds, tmp_path):
    if "rle" not in seeds:
        pytest.skip("no RLE encoder")
    data = bytearray(seeds["rle"])
    # (7FE0,0010) OB, 2 reserved bytes, undefined length; the offset table item; the fragment item
    table = data.index(b"\xe0\x7f\x10\x00OB") + 12
    fragment = table + 8 + int.from_bytes(data[table + 4 : table + 8], "little") + 8
    first_segment = fragment + int.from_bytes(data[fragment + 4 : fragment + 8], "little")
    assert data[first_segment + 4] == 0xF1  # replicate the next byte 16 times
    data[first_segment + 4] = 0xF0  # 17 times: the run overruns the 512-byte segment
    path = tmp_path / "bad_rle.dcm"
    path.write_bytes(bytes(data))
    slices, kind = check_file(path)
    assert kind == "image" and len(slices) == 1
    assert load_or_reject(group_series(slices)[0], SeriesChecks(min_slices=1)) is None


# ------------------------------------------------------------------------------------------------
# 2. slice geometry

NUMBER = st.one_of(
    st.sampled_from([0.0, 1.0, -1.0, 0.5, 2.5]),
    st.floats(-500, 500, allow_nan=False).map(lambda x: float(f"{x:.6g}")),
)
BAD_TEXT = st.sampled_from(["nan", "NaN", "inf", "-inf", "1e300", "-1e300", "1e-300", "", "abc", "1e400"])
UNIT_ORIENTATIONS = [
    (1, 0, 0, 0, 1, 0),  # axial
    (-1, 0, 0, 0, 1, 0),  # axial, normal towards the feet
    (1, 0, 0, 0, 0, -1),  # coronal
    (0, 1, 0, 0, 0, -1),  # sagittal
    (0.8, 0.6, 0, -0.6, 0.8, 0),  # axial, rotated in plane
    (1, 0, 0, 0, 0.99619470, -0.08715574),  # 5 degree gantry tilt
]


def rarely(strategy: st.SearchStrategy, default=None) -> st.SearchStrategy:
    """`strategy` one time in four, else `default` (so that most series keep their geometry)."""
    return st.integers(0, 3).flatmap(lambda k: strategy if k == 3 else st.just(default))


def ds_text(x: float) -> str:
    return f"{x:.10g}"[:16]  # DS values hold at most 16 characters


@st.composite
def orientations(draw) -> tuple[float, ...]:
    return draw(
        st.one_of(
            st.sampled_from(UNIT_ORIENTATIONS),
            st.tuples(*[NUMBER] * 6),  # anything: non-unit, non-orthogonal, zero
            NUMBER.flatmap(lambda a: st.just((a, 0.0, 0.0, 2 * a, 0.0, 0.0))),  # parallel rows and columns
        )
    )


@st.composite
def geometry_series(draw) -> list[dict]:
    """Per-slice tag values (strings, or None for a missing tag) of one series of 1-12 slices."""
    n = draw(st.integers(1, 12), label="n")
    orientation = draw(orientations(), label="orientation")
    row, col = np.array(orientation[:3], float), np.array(orientation[3:], float)
    normal = np.cross(row, col)
    base = np.array(draw(st.tuples(NUMBER, NUMBER, NUMBER), label="base"))
    base = base + draw(rarely(st.sampled_from([1e15, -1e300]), 0.0), label="offset")
    step_size = draw(st.one_of(st.sampled_from([0.0, 1.0, -1.0, 2.5, -0.7, 1e-4, 1e300]), NUMBER), label="step")
    step = draw(st.one_of(st.just(normal * step_size), st.tuples(NUMBER, NUMBER, NUMBER).map(np.array)), label="step_vector")
    # slot k of slice i: k = i is a regular series, a repeated slot a duplicate, a skipped slot a gap
    slots = draw(
        st.one_of(
            st.just(list(range(n))),
            st.lists(st.integers(0, 2 * n), min_size=n, max_size=n, unique=True),  # gaps, shuffled
            rarely(st.lists(st.integers(0, n), min_size=n, max_size=n), list(range(n))),  # duplicates too
        ),
        label="slots",
    )
    jitter = draw(
        st.lists(st.tuples(NUMBER, NUMBER, NUMBER).map(lambda v: np.array(v) * 0.01), min_size=n, max_size=n), label="jitter"
    )
    use_jitter = draw(st.booleans(), label="use_jitter")
    spacing = draw(
        st.one_of(
            st.sampled_from([("0.8", "0.8"), ("1", "2.5"), ("0", "1"), ("-1", "1"), ("1e-9", "1")]),
            st.tuples(NUMBER, NUMBER).map(lambda v: tuple(map(ds_text, v))),
            rarely(st.tuples(BAD_TEXT, BAD_TEXT), ("0.8", "0.8")),
        ),
        label="spacing",
    )
    # at most one broken tag value and one missing tag, each on one slice
    broken = draw(rarely(st.tuples(st.integers(0, n - 1), st.integers(0, 2), BAD_TEXT)), label="broken")
    missing = draw(
        rarely(st.tuples(st.integers(0, n - 1), st.sampled_from(["position", "orientation", "spacing"]))), label="missing"
    )
    tilted = draw(st.one_of(st.none(), st.tuples(st.integers(0, n - 1), st.sampled_from([1e-4, 0.01, 0.5]))), label="tilted")
    out = []
    with np.errstate(all="ignore"):
        for i in range(n):
            position = base + slots[i] * step + (jitter[i] if use_jitter else 0.0)
            orient = np.array(orientation, float)
            if tilted and tilted[0] == i:
                orient[1] += tilted[1]  # a slice of another (or barely another) orientation
            tags = dict(
                position=[ds_text(v) for v in position],
                orientation=[ds_text(v) for v in orient],
                spacing=list(spacing),
            )
            if broken and broken[0] == i:
                tags["position"][broken[1]] = broken[2]
            if missing and missing[0] == i:
                tags[missing[1]] = None
            out.append(tags)
    return out


@settings(max_examples=200, **FUZZ)
@given(tags=geometry_series(), seed=st.integers(0, 2**16))
def test_any_slice_geometry_gives_a_consistent_volume_or_a_series_error(tmp_path_factory, tags, seed):
    root = tmp_path_factory.mktemp("geometry")
    order = list(range(len(tags)))
    random.Random(seed).shuffle(order)  # file names and InstanceNumber carry no order
    paths = {}
    for index, i in enumerate(order):
        pixels = np.full((8, 8), 2000 + i, np.uint16)  # each slice's HU names the slice
        pixels[0, 0] = 0  # not a constant image
        ds = ct_slice(pixels, instance=index + 1, **tags[i])
        paths[save(ds, root / f"{index:02d}")] = i
    headers = []
    for path in sorted(paths):
        slices, kind = check_file(Path(path))
        assert kind == "image" and len(slices) == 1
        headers += slices
    position_of = {h.path: h.position for h in headers}
    for series in group_series(headers):
        volume = load_or_reject(series, SeriesChecks(min_slices=1))
        if volume is None:
            continue
        assert volume.array.shape == (8, 8, len(series.slices))
        lps = lps_of(volume)
        assert np.all(np.isfinite(lps)), lps
        # which slice landed in each plane, read back from its pixels
        ids = [int(round(float(volume.array[1, 1, k]) - INTERCEPT)) - 2000 for k in range(volume.array.shape[2])]
        by_id = {i: p for p, i in paths.items()}
        positions = np.array([position_of[by_id[i]] for i in ids])
        normal = series.normal
        if len(ids) == 1 and np.linalg.norm(normal) < 1e-6:
            continue  # a lone slice with degenerate orientation: see test_degenerate_orientation_is_missing_geometry
        along = positions @ normal
        assert np.all(np.diff(along) > 0), along  # ordered along the normal
        assert float(np.dot(lps[:3, 2], normal)) > 0  # and the slice axis points that way
        np.testing.assert_allclose(lps[:3, 3], positions[0], rtol=1e-9, atol=1e-9)
        if len(ids) > 1:
            np.testing.assert_allclose(lps[:3, 2] * (len(ids) - 1), positions[-1] - positions[0], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("orientation", [("0",) * 6, ("1", "0", "0", "1", "0", "0")], ids=["zero", "parallel"])
def test_degenerate_orientation_is_missing_geometry(tmp_path, orientation):
    path = save(ct_slice(np.full((8, 8), 1000, np.uint16), orientation=orientation), tmp_path / "degenerate.dcm")
    slices, _ = check_file(Path(path))
    with pytest.raises(SeriesError):
        load_series(group_series(slices)[0], SeriesChecks(min_slices=1))


# ------------------------------------------------------------------------------------------------
# 3. file order


STACK = np.random.default_rng(7).integers(0, 2000, size=(6, 16, 12), dtype=np.uint16)  # non-square: no row/column swap


def write_series(root: Path, order: list[int], instances: list[int]) -> list[str]:
    """Six axial slices of `STACK`, 1.25 mm apart, written in `order` with the given InstanceNumbers."""
    root.mkdir()
    study, series = "1.2.826.0.1.3680043.8.498.1", "1.2.826.0.1.3680043.8.498.2"
    for index, i in enumerate(order):
        ds = ct_slice(
            STACK[i],
            position=("-100", "-120.5", ds_text(50 - 1.25 * i)),  # head to feet: z decreases with i
            spacing=("0.75", "0.6"),
            series_uid=series,
            study_uid=study,
            instance=instances[index],
        )
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = f"1.2.826.0.1.3680043.8.498.3.{i}"
        save(ds, root / f"f{index}.dcm")
    return sorted(str(p) for p in root.iterdir())


def load_dir(files: list[str]) -> Volume:
    headers = [h for f in files for h in read_header(f)[0]]
    series = group_series(headers)
    assert len(series) == 1
    return load_series(series[0], SeriesChecks())


def test_file_order_and_instance_number_do_not_change_the_volume(tmp_path):
    reference = load_dir(write_series(tmp_path / "ref", list(range(6)), [1, 2, 3, 4, 5, 6]))
    assert reference.array.shape == (12, 16, 6)
    lps = lps_of(reference)
    np.testing.assert_allclose(lps[:3, 3], [-100, -120.5, 50 - 1.25 * 5])  # origin at the lowest slice
    np.testing.assert_allclose(lps[:3, :3], np.diag([0.6, 0.75, 1.25]), atol=1e-9)
    for k in range(6):  # plane k is the k-th slice from the feet, indexed (column, row)
        np.testing.assert_array_equal(reference.array[..., k], STACK[5 - k].T.astype(np.float32) + np.float32(INTERCEPT))
    rng = random.Random(3)
    for trial in range(4):
        order = list(range(6))
        rng.shuffle(order)
        instances = [rng.randint(1, 99) for _ in order] if trial % 2 else list(range(6, 0, -1))
        files = write_series(tmp_path / f"t{trial}", order, instances)
        if trial == 3:
            files = files[::-1]
        volume = load_dir(files)
        np.testing.assert_array_equal(volume.array, reference.array)
        np.testing.assert_array_equal(volume.affine, reference.affine)
