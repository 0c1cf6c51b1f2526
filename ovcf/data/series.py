"""Slices -> validated series -> HU volume with its RAS affine.

Slices are grouped by patient, study and series, split further by orientation and image size
(localizers, tri-planar scouts), and ordered by their position along the slice normal (never by
InstanceNumber). Each check below either fixes what is safe to fix (exact duplicate files, a
gantry tilt, per-slice rescale) and says so in `notes`, or rejects the series with one of
`SERIES_PROBLEMS` and a message. The affine comes from ImageOrientationPatient, the slice
positions and PixelSpacing alone, so a feet-first or reversed series lands in the same world
coordinates as its mask.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import numpy as np
from pydicom.pixels import get_decoder

from ovcf.data.dicom import LOSSY, LOSSY_8BIT, UNCOMPRESSED, SliceHeader, read_frames, read_native, to_hu
from ovcf.data.volume import LPS_TO_RAS, Volume
from ovcf.errors import CohortError

SERIES_PROBLEMS = (
    "missing_geometry",
    "too_few_slices",
    "duplicate_positions",
    "missing_slices",
    "unreadable_files",  # slices missing where files beside the series could not be read (damaged headers)
    "uneven_spacing",
    "gantry_tilt",
    "not_grayscale",
    "lossy_8bit",
    "low_bit_depth",
    "unsupported_transfer_syntax",
    "truncated",
    "undecodable",
    "implausible_hu",
)


@dataclass(frozen=True)
class SeriesChecks:
    """Tolerances of series validation (the `ingest` config group)."""

    min_slices: int = 3
    spacing_tolerance: float = 0.1  # relative deviation of one slice step from the median step
    spacing_tolerance_mm: float = 0.05  # absolute floor of that tolerance
    max_tilt_deg: float = 0.5  # tilt (tag or geometry) up to this is ignored
    correct_tilt: bool = True  # keep a tilted series with its sheared affine; False rejects it
    max_correctable_tilt_deg: float = 30.0


class SeriesError(CohortError):
    """A series that cannot become a volume; `code` is one of `SERIES_PROBLEMS`."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


@dataclass
class Series:
    """Slices of one (patient, study, series) with one orientation and image size."""

    patient_id: str
    study_uid: str
    series_uid: str
    modality: str
    slices: list[SliceHeader] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # "code: text" of what validation fixed or a reader should know
    unreadable: int = 0  # unreadable files in the folders of its slices (set by `ovcf.data.ct.scan_folder`)

    @property
    def name(self) -> str:
        """A label for messages that carries no UID or path (those can identify a patient)."""
        number = self.slices[0].series_number if self.slices else ""
        return f"{self.modality or '?'} series #{number or '?'} ({len(self.slices)} slices)"

    @property
    def normal(self) -> np.ndarray | None:
        o = self.slices[0].orientation
        return None if o is None else np.cross(o[:3], o[3:])

    @property
    def is_axial(self) -> bool:
        n = self.normal
        return n is not None and abs(n[2]) > 0.8

    @property
    def thickness(self) -> float:
        return self.slices[0].thickness or float("inf")

    @property
    def is_localizer(self) -> bool:
        return "LOCALIZER" in self.slices[0].image_type


def group_series(headers: list[SliceHeader]) -> list[Series]:
    """Groups slices by patient/study/series, split further by orientation and image size."""
    groups: dict[tuple, Series] = {}
    for h in headers:
        o = None if h.orientation is None else tuple(np.round(h.orientation, 3))
        key = (h.patient_id, h.study_uid, h.series_uid, o, h.shape)
        if key not in groups:
            groups[key] = Series(h.patient_id, h.study_uid, h.series_uid, h.modality)
        groups[key].slices.append(h)
    out = list(groups.values())
    parts = Counter((s.patient_id, s.study_uid, s.series_uid) for s in out)
    for s in out:
        n = parts[(s.patient_id, s.study_uid, s.series_uid)]
        if n > 1:
            s.notes.append(f"mixed_orientation: split from a series holding {n} orientations or image sizes")
    return out


def ct_candidates(series: list[Series], series_uid: str | None = None) -> list[Series]:
    """CT series in the contract's order of preference: the named one, else axial, most slices, thinnest."""
    if series_uid:
        named = [s for s in series if s.series_uid == series_uid]
        return sorted(named, key=lambda s: (not s.is_axial, -len(s.slices)))
    candidates = [s for s in series if s.modality == "CT" and s.is_axial and not s.is_localizer]
    return sorted(candidates, key=lambda s: (-len(s.slices), s.thickness))


def validate(series: Series, checks: SeriesChecks = SeriesChecks()) -> tuple[list[SliceHeader], np.ndarray]:
    """Ordered slices and the voxel-to-LPS affine, or `SeriesError`; fixes are added to `notes`."""
    first = series.slices[0]
    if first.samples != 1 or not first.photometric.startswith("MONOCHROME"):
        raise SeriesError("not_grayscale", f"{series.name} is {first.photometric or 'not'} colour, not a grayscale CT")
    ts = first.transfer_syntax
    if ts in LOSSY_8BIT:
        raise SeriesError("lossy_8bit", f"{series.name} was compressed to 8 bits (JPEG baseline), which cannot carry HU")
    if first.bits_stored <= 8:
        raise SeriesError("low_bit_depth", f"{series.name} stores {first.bits_stored}-bit pixels, too few for HU")
    if ts in LOSSY or first.lossy:
        series.notes.append("lossy_compression: the pixels were lossy-compressed; HU are approximate")
    if ts not in UNCOMPRESSED:
        try:
            available = get_decoder(ts).is_available
        except (NotImplementedError, ValueError, KeyError):
            available = False
        if not available:
            raise SeriesError(
                "unsupported_transfer_syntax", f"{series.name} uses transfer syntax {ts}, which no installed decoder reads"
            )
    if any(s.orientation is None or s.position is None or s.pixel_spacing is None for s in series.slices):
        raise SeriesError(
            "missing_geometry", f"{series.name} lacks ImageOrientationPatient, ImagePositionPatient or PixelSpacing"
        )
    row, col = np.array(first.orientation[:3]), np.array(first.orientation[3:])
    if abs(np.linalg.norm(row) - 1) > 0.01 or abs(np.linalg.norm(col) - 1) > 0.01 or abs(row @ col) > 0.01:
        raise SeriesError("missing_geometry", f"{series.name}: ImageOrientationPatient is not two orthogonal unit vectors")
    if min(first.pixel_spacing) <= 0:
        raise SeriesError("missing_geometry", f"{series.name}: PixelSpacing {first.pixel_spacing} is not positive")
    normal = series.normal
    ordered = sorted(series.slices, key=lambda s: float(np.dot(s.position, normal)))
    ordered = _drop_exact_duplicates(series, ordered)
    if len(ordered) < checks.min_slices:
        raise SeriesError("too_few_slices", f"{series.name}: {len(ordered)} slice(s), fewer than {checks.min_slices}")
    positions = np.array([s.position for s in ordered])
    if len(ordered) == 1:  # a single slice (allowed with min_slices=1): its thickness is its depth
        return ordered, _lps(first, normal * (series.thickness if np.isfinite(series.thickness) else 1.0), positions[0])
    along = positions @ normal
    steps = np.diff(along)
    if np.any(steps < 1e-3):
        n = int(np.sum(steps < 1e-3)) + 1
        raise SeriesError("duplicate_positions", f"{series.name}: {n} different slices share a position; not one volume")
    _check_spacing(series, steps, checks)
    step = (positions[-1] - positions[0]) / (len(ordered) - 1)
    _check_tilt(series, step, normal, checks)
    offsets = positions - positions[0] - np.outer(np.arange(len(ordered)), step)
    if np.max(np.linalg.norm(offsets, axis=1)) > max(checks.spacing_tolerance_mm, checks.spacing_tolerance * np.median(steps)):
        raise SeriesError("uneven_spacing", f"{series.name}: slice positions do not lie on one straight line")
    if len({s.rescale for s in ordered}) > 1:
        series.notes.append("rescale_per_slice: rescale varies per slice; applied per slice")

    return ordered, _lps(first, step, positions[0])


def _lps(first: SliceHeader, step: np.ndarray, origin: np.ndarray) -> np.ndarray:
    """Voxel (column, row, slice) -> LPS mm."""
    row_cos, col_cos = np.array(first.orientation[:3]), np.array(first.orientation[3:])
    dy, dx = first.pixel_spacing  # DICOM: spacing between rows, then between columns
    lps = np.eye(4)
    lps[:3, 0], lps[:3, 1], lps[:3, 2], lps[:3, 3] = row_cos * dx, col_cos * dy, step, origin
    return lps


def _drop_exact_duplicates(series: Series, ordered: list[SliceHeader]) -> list[SliceHeader]:
    """Drops a slice exported twice: same position and the same file content or SOPInstanceUID."""
    seen, kept = set(), []
    for s in ordered:
        keys = {(s.digest, s.frame, s.position)}
        if s.sop_uid:
            keys.add((s.sop_uid, s.frame, s.position))
        if keys & seen:
            continue
        seen |= keys
        kept.append(s)
    if len(kept) < len(ordered):
        series.notes.append(f"duplicates_dropped: {len(ordered) - len(kept)} exact duplicate slice(s) dropped")
    return kept


def _check_spacing(series: Series, steps: np.ndarray, checks: SeriesChecks) -> None:
    median = float(np.median(steps))
    tolerance = max(checks.spacing_tolerance_mm, checks.spacing_tolerance * median)
    bad = np.abs(steps - median) > tolerance
    if not bad.any():
        return
    ratios = steps[bad] / median
    gaps = np.abs(ratios - np.round(ratios)) * median <= tolerance
    if np.all(gaps & (np.round(ratios) >= 2)):
        missing = int(np.sum(np.round(ratios) - 1))
        if series.unreadable:  # the slices are there, their headers damaged: not a gap in the export
            raise SeriesError(
                "unreadable_files",
                f"{series.name}: {missing} slice(s) missing and {series.unreadable} file(s) in its folder cannot be read "
                "(damaged DICOM header): export the series again",
            )
        raise SeriesError(
            "missing_slices",
            f"{series.name}: {missing} slice(s) missing (gap of {steps[bad].max():.2f} mm, step {median:.2f} mm)",
        )
    raise SeriesError(
        "uneven_spacing",
        f"{series.name}: slice steps range {steps.min():.2f}-{steps.max():.2f} mm around a median of {median:.2f} mm",
    )


def _check_tilt(series: Series, step: np.ndarray, normal: np.ndarray, checks: SeriesChecks) -> None:
    cos = abs(float(np.dot(step, normal))) / max(float(np.linalg.norm(step)), 1e-9)
    geometric = float(np.degrees(np.arccos(min(cos, 1.0))))
    tag = abs(series.slices[0].tilt)
    if geometric <= checks.max_tilt_deg:
        if tag > checks.max_tilt_deg:
            series.notes.append(f"gantry_tilt: {tag:.1f} deg in the tag, already corrected in the slice positions")
        return
    if not checks.correct_tilt or geometric > checks.max_correctable_tilt_deg:
        raise SeriesError(
            "gantry_tilt", f"{series.name}: gantry tilt of {geometric:.1f} deg (set ingest.correct_tilt to keep it)"
        )
    series.notes.append(f"gantry_tilt: {geometric:.1f} deg, kept with a sheared affine and resampled away in the ROI")


def load_series(series: Series, checks: SeriesChecks = SeriesChecks()) -> Volume:
    """Validates, reads the pixels, converts to HU; raises `SeriesError` naming the problem."""
    ordered, lps = validate(series, checks)
    first = ordered[0]
    planes, decoded = [], {}
    for index, s in enumerate(ordered):
        try:
            if s.pixel_offset >= 0:
                stored, ds = read_native(s), None
            else:
                if s.path not in decoded:
                    decoded = {s.path: read_frames(s.path)}  # multi-frame files: decode once for all frames
                frames, ds = decoded[s.path]
                stored = frames[max(s.frame, 0)]
            if stored.shape != s.shape:
                raise ValueError(f"decoded shape {stored.shape} differs from Rows x Columns {s.shape}")
            hu = to_hu(stored, s, ds)
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as exc:  # noqa: BLE001 - decoders raise many types (a Rust panic is a BaseException)
            text = str(exc).lower()
            truncated = ("length", "truncat", "short", "end of", "eof", "less than expected")
            code = "truncated" if any(w in text for w in truncated) else "undecodable"
            raise SeriesError(code, f"{series.name}: pixel data of slice {index + 1} cannot be decoded ({exc})") from exc
        planes.append(hu.T)  # (rows, columns) -> (i = column, j = row)
    array = np.stack(planes, axis=-1)
    # A CT's field of view always holds some air, fat or soft tissue, and metal (the only thing above
    # 10000 HU) is small: anything else is a sign or rescale error.
    sample = array[::4, ::4, ::2]  # a quarter of the voxels per axis is plenty for two quantiles
    low, huge = float(np.percentile(sample, 1)), float(np.mean(sample > 10000))
    if min(first.shape) >= 64 and (low > 500 or huge > 0.05):
        raise SeriesError(
            "implausible_hu",
            f"{series.name}: HU not those of a CT (1st percentile {low:.0f}, {huge:.0%} above 10000): check sign and rescale",
        )
    return Volume(array, LPS_TO_RAS @ lps)
