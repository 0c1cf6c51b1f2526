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
) -> str:
    """Writes the axial series, head-first or feet-first as the scanner's profile says.

    Returns the SeriesInstanceUID.
    """
    folder.mkdir(parents=True, exist_ok=True)
    stored = np.clip(np.rint(hu - rescale_intercept), 0, 4095).astype(np.uint16)
    if scanner.feet_first:  # image columns run to the patient's right; scan starts at the feet
        stored = stored[::-1]
        orientation, x0, order = [-1, 0, 0, 0, 1, 0], grid.x[-1], range(len(grid.z))
    else:
        orientation, x0, order = [1, 0, 0, 0, 1, 0], grid.x[0], range(len(grid.z) - 1, -1, -1)
    series_uid = uid(header.uid_seed, f"series{series_number}")

    meta = FileMetaDataset()
    sop_class = CTImageStorage if modality == "CT" else MRImageStorage
    meta.MediaStorageSOPClassUID = sop_class
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = sop_class
    ds.Modality = modality
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
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
    ds.SeriesInstanceUID = series_uid
    ds.FrameOfReferenceUID = uid(header.uid_seed, "frame")
    ds.StudyID = "1"
    ds.SeriesNumber = series_number
    ds.SeriesDescription = "Spine 1.0 bone" if scanner.sharpen > 0 else "Spine soft"
    ds.Manufacturer = scanner.manufacturer
    ds.ManufacturerModelName = scanner.model
    ds.ConvolutionKernel = scanner.kernel
    ds.KVP = "120"
    ds.BodyPartExamined = "SPINE"
    ds.PatientPosition = "FFS" if scanner.feet_first else "HFS"
    ds.SliceThickness = f"{scanner.slice_thickness:g}"
    ds.SpacingBetweenSlices = f"{scanner.slice_spacing:g}"
    ds.PixelSpacing = [f"{grid.spacing[1]:.6g}", f"{grid.spacing[0]:.6g}"]  # row, column spacing
    ds.ImageOrientationPatient = orientation
    ds.Rows, ds.Columns = hu.shape[1], hu.shape[0]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.RescaleIntercept = f"{rescale_intercept:g}"
    ds.RescaleSlope = "1"
    ds.RescaleType = "HU"
    ds.WindowCenter, ds.WindowWidth = "400", "1800"

    for number, k in enumerate(order, start=1):
        ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID = uid(header.uid_seed, f"{series_number}.{k}")
        ds.InstanceNumber = number
        ds.ImagePositionPatient = [f"{x0:.4f}", f"{grid.y[0]:.4f}", f"{grid.z[k]:.4f}"]
        ds.SliceLocation = f"{grid.z[k]:.4f}"
        ds.PixelData = np.ascontiguousarray(stored[:, :, k].T).tobytes()
        ds.save_as(folder / f"IM{number:04d}.dcm", enforce_file_format=True)
    return series_uid


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
