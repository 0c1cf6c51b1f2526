"""Writes a phantom as a hospital would export it: one DICOM file per slice, and a NIfTI mask.

The DICOM geometry tags are the only place the volume's position lives, so a reader that gets
orientation, slice order or rescaling wrong produces a visibly wrong volume or a mask mismatch.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, MRImageStorage, generate_uid

from ovcf.synth.phantom import Grid
from ovcf.synth.scanner import Scanner

UID_ROOT = "1.2.826.0.1.3680043.10.1514."  # example root; only its shape matters


@dataclass
class PatientHeader:
    """Identity and study data of one patient, PHI included on purpose (tests must catch leaks)."""

    patient_id: str
    name: str
    birth_date: str  # YYYYMMDD
    sex: str
    age: int
    institution: str
    accession: str
    physician: str
    study_date: str  # YYYYMMDD
    uid_seed: str


def uid(seed: str, what: str) -> str:
    return generate_uid(prefix=UID_ROOT, entropy_srcs=[seed, what])


def lps_affine(grid: Grid) -> np.ndarray:
    """Voxel (x, y, z) index -> LPS millimetres for the phantom's axis-aligned grid."""
    aff = np.diag([*grid.spacing, 1.0])
    aff[:3, 3] = grid.x[0], grid.y[0], grid.z[0]
    return aff


def write_ct_series(
    folder: Path,
    hu: np.ndarray,
    grid: Grid,
    scanner: Scanner,
    header: PatientHeader,
    series_number: int = 2,
    rescale_intercept: float = -1024.0,
    modality: str = "CT",
    extension: str = ".dcm",
    description: str | None = None,
) -> str:
    """Writes the axial series, head-first or feet-first as the scanner's profile says.

    Returns the SeriesInstanceUID.
    """
    stored = np.clip(np.rint(hu - rescale_intercept), 0, 4095).astype(np.uint16)
    if scanner.feet_first:  # image columns run to the patient's right; scan starts at the feet
        stored = stored[::-1]
        orientation, x0, order = [-1, 0, 0, 0, 1, 0], grid.x[-1], range(len(grid.z))
    else:
        orientation, x0, order = [1, 0, 0, 0, 1, 0], grid.x[0], range(len(grid.z) - 1, -1, -1)
    ds = _dataset(header, scanner, modality, series_number, ["ORIGINAL", "PRIMARY", "AXIAL"])
    ds.SeriesDescription = description or ("Spine 1.0 bone" if scanner.sharpen > 0 else "Spine soft")
    ds.PatientPosition = "FFS" if scanner.feet_first else "HFS"
    ds.SliceThickness = f"{scanner.slice_thickness:g}"
    ds.SpacingBetweenSlices = f"{scanner.slice_spacing:g}"
    ds.RescaleIntercept = f"{rescale_intercept:g}"
    ds.RescaleSlope = "1"
    ds.RescaleType = "HU"
    ds.WindowCenter, ds.WindowWidth = "400", "1800"
    planes = [stored[:, :, k].T for k in order]
    positions = [(x0, grid.y[0], grid.z[k]) for k in order]
    _write_planes(folder, ds, planes, positions, orientation, (grid.spacing[1], grid.spacing[0]), header, extension)
    return ds.SeriesInstanceUID


def write_localizer(folder: Path, hu: np.ndarray, grid: Grid, scanner: Scanner, header: PatientHeader, extension: str) -> None:
    """The coronal scout every CT exam starts with: one projection image, ImageType LOCALIZER."""
    projection = hu.mean(axis=1)  # (x, z): average along the antero-posterior axis
    plane = np.clip(np.rint(projection + 1024), 0, 4095).astype(np.uint16).T[::-1]  # rows run head to feet
    ds = _dataset(header, scanner, "CT", 1, ["ORIGINAL", "PRIMARY", "LOCALIZER"])
    ds.SeriesDescription = "Topogram 0.6"
    ds.RescaleIntercept, ds.RescaleSlope = "-1024", "1"
    position = (grid.x[0], 0.0, grid.z[-1])
    spacing = (grid.spacing[2], grid.spacing[0])
    _write_planes(folder, ds, [plane], [position], [1, 0, 0, 0, 0, -1], spacing, header, extension)


def write_mr_series(folder: Path, hu: np.ndarray, grid: Grid, scanner: Scanner, header: PatientHeader, extension: str) -> None:
    """A few sagittal slices standing in for the MRI of the same patient (its own modality and study)."""
    mid = len(grid.x) // 2
    columns = [mid + d for d in (-8, -4, 0, 4, 8) if 0 <= mid + d < len(grid.x)]
    signal = np.clip((hu + 1000.0) * 0.8, 0, 4000).astype(np.uint16)  # a T1-like grey scale, not HU
    ds = _dataset(header, scanner, "MR", 5, ["ORIGINAL", "PRIMARY", "M", "ND"])
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = MRImageStorage
    ds.SeriesDescription = "t1_tse_sag"
    ds.StudyInstanceUID = uid(header.uid_seed, "mr-study")
    ds.FrameOfReferenceUID = uid(header.uid_seed, "mr-frame")
    ds.SliceThickness = f"{4 * grid.spacing[0]:g}"
    planes = [signal[i].T[::-1] for i in columns]  # (y, z) -> rows head to feet, columns anterior to posterior
    positions = [(grid.x[i], grid.y[0], grid.z[-1]) for i in columns]
    _write_planes(folder, ds, planes, positions, [0, 1, 0, 0, 0, -1], (grid.spacing[2], grid.spacing[1]), header, extension)


def _dataset(header: PatientHeader, scanner: Scanner, modality: str, series_number: int, image_type: list[str]) -> Dataset:
    """Patient, study and equipment tags shared by all series of an exam (PHI included on purpose)."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage if modality == "CT" else MRImageStorage
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.Modality = modality
    ds.ImageType = image_type
    ds.PatientID = header.patient_id
    ds.PatientName = header.name
    ds.PatientBirthDate = header.birth_date
    ds.PatientSex = header.sex
    ds.PatientAge = f"{header.age:03d}Y"
    ds.InstitutionName = header.institution
    ds.AccessionNumber = header.accession
    ds.ReferringPhysicianName = header.physician
    ds.StudyDate = ds.SeriesDate = ds.AcquisitionDate = ds.ContentDate = header.study_date
    ds.StudyTime = ds.SeriesTime = "101500"
    ds.StudyInstanceUID = uid(header.uid_seed, "study")
    ds.SeriesInstanceUID = uid(header.uid_seed, f"series{series_number}")
    ds.FrameOfReferenceUID = uid(header.uid_seed, "frame")
    ds.StudyID = "1"
    ds.SeriesNumber = series_number
    ds.Manufacturer = scanner.manufacturer
    ds.ManufacturerModelName = scanner.model
    ds.ConvolutionKernel = scanner.kernel
    ds.KVP = "120"
    ds.BodyPartExamined = "SPINE"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    return ds


def _write_planes(
    folder: Path, ds: Dataset, planes, positions, orientation, pixel_spacing, header: PatientHeader, extension: str
) -> None:
    """One file per plane (rows x columns uint16), numbered in acquisition order."""
    folder.mkdir(parents=True, exist_ok=True)
    ds.ImageOrientationPatient = list(orientation)
    ds.PixelSpacing = [f"{pixel_spacing[0]:.6g}", f"{pixel_spacing[1]:.6g}"]  # between rows, between columns
    ds.Rows, ds.Columns = planes[0].shape
    for number, (plane, position) in enumerate(zip(planes, positions), start=1):
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = uid(header.uid_seed, f"{ds.SeriesNumber}.{number}")
        ds.InstanceNumber = number
        ds.ImagePositionPatient = [f"{v:.4f}" for v in position]
        if ds.ImageType[-1] == "AXIAL":
            ds.SliceLocation = f"{position[2]:.4f}"
        ds.PixelData = np.ascontiguousarray(plane).tobytes()
        ds.save_as(folder / f"IM{number:04d}{extension}", enforce_file_format=True)


def write_mask(path: Path, labels: np.ndarray, grid: Grid, orientation: str = "LPS") -> None:
    """Writes the label map on the CT's voxels, stored in the given axis orientation (e.g. RAS)."""
    ras = np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps_affine(grid)
    img = nib.Nifti1Image(labels.astype(np.uint8), ras)
    current = nib.orientations.io_orientation(ras)
    target = nib.orientations.axcodes2ornt(tuple(orientation))
    img = img.as_reoriented(nib.orientations.ornt_transform(current, target))
    img.set_qform(img.affine, code=1)
    img.set_sform(img.affine, code=1)
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(img, path)
