"""DICOM export -> series -> HU volume with its RAS affine.

Slices are ordered by their position along the slice normal (never by InstanceNumber), and the
affine comes from ImageOrientationPatient / ImagePositionPatient / PixelSpacing alone, so a
feet-first or reversed series lands in the same world coordinates as its mask.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom
from pydicom.errors import InvalidDicomError
from pydicom.pixels import apply_modality_lut

from ovcf.data.volume import LPS_TO_RAS, Volume
from ovcf.errors import CohortError

_HEADER_TAGS = [
    "PatientID",
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "Modality",
    "ImageOrientationPatient",
    "ImagePositionPatient",
    "PixelSpacing",
    "Rows",
    "Columns",
    "SliceThickness",
    "ImageType",
    "StudyDate",
    "AcquisitionDate",
    "NumberOfFrames",
]


@dataclass
class SliceHeader:
    """What series assembly needs of one file, read without its pixels."""

    path: str
    patient_id: str
    study_uid: str
    series_uid: str
    modality: str
    orientation: tuple[float, ...] | None
    position: tuple[float, ...] | None
    shape: tuple[int, int]
    pixel_spacing: tuple[float, float] | None
    thickness: float | None
    image_type: tuple[str, ...]
    date: str
    frames: int


def _floats(value, n: int) -> tuple[float, ...] | None:
    try:
        out = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        return None
    return out if len(out) == n else None


def read_header(path: str) -> SliceHeader | None:
    """Header of one file, or None when it is not a DICOM image."""
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=_HEADER_TAGS)
    except (InvalidDicomError, OSError, ValueError, EOFError):
        return None
    if "Rows" not in ds or "Columns" not in ds:
        return None  # dose reports, structured reports, DICOMDIR
    thickness = ds.get("SliceThickness")
    try:
        thickness = float(thickness) if thickness not in (None, "") else None
    except (TypeError, ValueError):
        thickness = None
    return SliceHeader(
        path=path,
        patient_id=str(ds.get("PatientID", "")).strip(),
        study_uid=str(ds.get("StudyInstanceUID", "")),
        series_uid=str(ds.get("SeriesInstanceUID", "")),
        modality=str(ds.get("Modality", "")),
        orientation=_floats(ds.get("ImageOrientationPatient"), 6),
        position=_floats(ds.get("ImagePositionPatient"), 3),
        shape=(int(ds.Rows), int(ds.Columns)),
        pixel_spacing=_floats(ds.get("PixelSpacing"), 2),
        thickness=thickness,
        image_type=tuple(str(v).upper() for v in (ds.get("ImageType") or ())),
        date=str(ds.get("AcquisitionDate") or ds.get("StudyDate") or ""),
        frames=int(ds.get("NumberOfFrames") or 1),
    )


def list_files(root: Path) -> list[str]:
    """Every file under `root`, sorted, whatever the nesting or extension."""
    out = []
    for folder, _, names in os.walk(root):
        out.extend(os.path.join(folder, n) for n in names)
    return sorted(out)


@dataclass
class Series:
    """Slices of one (patient, study, series) with one orientation and image size."""

    patient_id: str
    study_uid: str
    series_uid: str
    modality: str
    slices: list[SliceHeader] = field(default_factory=list)

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
    return list(groups.values())


def choose_ct(series: list[Series], series_uid: str | None = None) -> Series | None:
    """The named series, else the axial CT with the most slices, then the thinnest slices."""
    if series_uid:
        named = [s for s in series if s.series_uid == series_uid]
        return max(named, key=lambda s: len(s.slices)) if named else None
    candidates = [
        s
        for s in series
        if s.modality == "CT" and s.is_axial and not s.is_localizer and len(s.slices) > 1 and s.slices[0].frames == 1
    ]
    if not candidates:
        return None
    return min(candidates, key=lambda s: (-len(s.slices), s.thickness))


def load_series(series: Series) -> Volume:
    """Reads the pixels, converts to HU and returns the volume with its voxel-to-RAS affine."""
    first = series.slices[0]
    if first.orientation is None or first.pixel_spacing is None or any(s.position is None for s in series.slices):
        raise CohortError(f"series {series.series_uid or '(no UID)'} lacks orientation, position or pixel spacing tags")
    normal = series.normal
    ordered = sorted(series.slices, key=lambda s: float(np.dot(s.position, normal)))
    planes = []
    for s in ordered:
        try:
            ds = pydicom.dcmread(s.path)
            stored = ds.pixel_array
            hu = apply_modality_lut(stored, ds).astype(np.float32)
        except Exception as exc:  # noqa: BLE001 - pydicom raises many types for broken pixel data
            raise CohortError(f"cannot decode pixel data of {Path(s.path).name}: {exc}") from exc
        padding = ds.get("PixelPaddingValue")
        if padding is not None:
            hu[stored == padding] = -1024.0  # padding outside the reconstruction circle is air
        planes.append(hu.T)  # (rows, columns) -> (i = column, j = row)
    array = np.stack(planes, axis=-1)

    row_cos, col_cos = np.array(first.orientation[:3]), np.array(first.orientation[3:])
    dy, dx = first.pixel_spacing  # DICOM: spacing between rows, then between columns
    p0, p1 = np.array(ordered[0].position), np.array(ordered[-1].position)
    step = (p1 - p0) / (len(ordered) - 1) if len(ordered) > 1 else normal * series.thickness
    lps = np.eye(4)
    lps[:3, 0], lps[:3, 1], lps[:3, 2], lps[:3, 3] = row_cos * dx, col_cos * dy, step, p0
    return Volume(array, LPS_TO_RAS @ lps)
