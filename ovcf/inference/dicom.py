"""Predict's results as DICOM objects: the vertebral bodies as a SEG, the findings per level as an SR.

A PACS files, and a viewer or a reporting system reads, DICOM objects rather than `report.json`:
the SEG overlays the predicted bodies on the CT, and the SR (a TID 1500 Measurement Report, what
reporting systems import) holds per level what `report.json` holds (acute probability and decision,
heights, their ratios, Genant grade), each level's group referencing its SEG segment and the CT
series. Both are built on one list of source headers (`source_headers`), so their patient, study
and references agree and follow one privacy rule, `SEG_MODES`.

Codes: the standard ones where DICOM has them (SNOMED CT for each vertebra, DICOM's TID 1500
concepts, UCUM units); the rest (acute probability, the heights, their ratios, the decision, the
Genant grade, the vertebrae T13 and L6 that SNOMED CT does not name) in the private scheme
`99OVCF`, declared in the SR's Coding Scheme Identification Sequence.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
from highdicom.coding_schemes import CodingSchemeIdentificationItem
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code
from pydicom.uid import generate_uid

from ovcf.atomic import write_atomic
from ovcf.contract import LEVEL_IDS
from ovcf.data.series import validate
from ovcf.errors import CohortError, ConfigError

SEG_FILE, SR_FILE = "seg.dcm", "sr.dcm"
SEG_MODES = {
    "research": "new UIDs and the pseudonym: nothing in it leads back to the patient or the source CT",
    "pacs": "the patient's identity and the source study, frame of reference and series, so a PACS files it with its CT",
}
SEG_TYPES = {
    "labelmap": "one frame per slice whose pixels are segment numbers (Label Map Segmentation, DICOM 2024c)",
    "binary": "one 1-bit frame per slice and segment (Segmentation Storage), for PACS and viewers that predate LABELMAP",
}
IMAGE = (
    "SOPClassUID", "Modality", "Rows", "Columns", "PixelSpacing", "ImageOrientationPatient", "ImagePositionPatient",
    "SliceThickness", "SamplesPerPixel", "PhotometricInterpretation", "BitsAllocated", "BitsStored", "HighBit",
    "PixelRepresentation", "SeriesNumber", "InstanceNumber", "SpecificCharacterSet",
)  # fmt: skip
SOURCE_UIDS = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "FrameOfReferenceUID")
IDENTITY = (
    "PatientID", "PatientName", "PatientBirthDate", "PatientSex",
    "StudyDate", "StudyTime", "AccessionNumber", "StudyID", "ReferringPhysicianName",
)  # fmt: skip

PRIVATE = "99OVCF"  # a private coding scheme: designators starting with 99 are reserved for local codes


def _private(value: str, meaning: str) -> Code:
    return Code(value, PRIVATE, meaning)


PROBABILITY = _private("PACUTE", "Probability of acute fracture")
MEASURED = {  # report.json's height keys, in the order the SR lists them, with their code and unit
    "anterior_mm": (_private("HANT", "Anterior vertebral body height"), codes.UCUM.Millimeter),
    "middle_mm": (_private("HMID", "Middle vertebral body height"), codes.UCUM.Millimeter),
    "posterior_mm": (_private("HPOST", "Posterior vertebral body height"), codes.UCUM.Millimeter),
    "anterior_ratio": (_private("RANTPOST", "Anterior to posterior height ratio"), codes.UCUM.Ratio),
    "middle_ratio": (_private("RMIDPOST", "Middle to posterior height ratio"), codes.UCUM.Ratio),
    "neighbour_ratio": (_private("RNEIGHBOUR", "Height ratio to intact neighbours"), codes.UCUM.Ratio),
    "height_loss": (_private("HLOSS", "Vertebral height loss"), codes.UCUM.Ratio),
}
NO_UNITS = Code("1", "UCUM", "no units")
DECISION = _private("ACUITY", "Fracture acuity")
DECISIONS = {"acute": _private("ACUTE", "Acute fracture"), "chronic": _private("CHRONIC", "Chronic fracture")}
GENANT = _private("GENANT", "Genant semiquantitative grade")
GENANT_GRADES = [
    _private(f"GENANT{g}", f"Genant grade {g} ({word})") for g, word in enumerate(("normal", "mild", "moderate", "severe"))
]
CT_PROCEDURE = codes.LN.CTUnspecifiedBodyRegion  # TID 1500's procedure (CID 100); the spine is in each finding site


def check_seg_mode(mode: str) -> str:
    """`mode` when it is one of `SEG_MODES`, else `ConfigError` naming them."""
    if mode not in SEG_MODES:
        raise ConfigError(f"seg_mode={mode}: use " + " or ".join(f"{k} ({v})" for k, v in SEG_MODES.items()))
    return mode


def check_seg_type(kind: str) -> str:
    """`kind` when it is one of `SEG_TYPES`, else `ConfigError` naming them."""
    if kind not in SEG_TYPES:
        raise ConfigError(f"seg_type={kind}: use " + " or ".join(f"{k} ({v})" for k, v in SEG_TYPES.items()))
    return kind


def source_headers(series, name: str, system, mode: str = "research") -> list[Dataset]:
    """What the SEG and the SR take from the source CT: each slice's geometry and, by `mode`, its UIDs and patient.

    The slices come in the order ingest validates them (`ovcf.data.series.validate`), which is the order
    of the label map's slices. `research`: the study, series, instance and frame-of-reference UIDs are
    new ones (consistent across the slices) and the patient is the pseudonym `name`, so nothing written
    references a source object or carries a date, name or number of the source. `pacs`: the source's
    UIDs and the patient's and study's identity, as a PACS needs them to file the outputs with the CT.
    Only these attributes reach highdicom, because it copies whatever patient, study and equipment
    attributes it finds in the first source dataset (institution, station, device serial number).
    """
    ordered, _ = validate(replace(series, notes=[]), system.checks.series)
    if any(h.frame >= 0 for h in ordered):
        raise CohortError(f"{name}: dicom_seg supports single-frame CT series; {series.name} is multi-frame")
    mode = check_seg_mode(mode)
    new = {keyword: hd.UID() for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "FrameOfReferenceUID")}
    return [_clean(pydicom.dcmread(h.path, stop_before_pixels=True, force=True), name, mode, new) for h in ordered]


def _clean(ds: Dataset, name: str, mode: str, new: dict[str, str]) -> Dataset:
    """One source slice's header reduced to what `mode` lets through (see `source_headers`); `new`: the
    research mode's study, series and frame-of-reference UIDs, shared by all slices."""
    copied = IMAGE if mode == "research" else IMAGE + SOURCE_UIDS + IDENTITY
    clean = Dataset()
    for keyword in (k for k in copied if k in ds):
        setattr(clean, keyword, ds.data_element(keyword).value)
    if mode == "research":
        for keyword, uid in new.items():
            setattr(clean, keyword, uid)
        clean.SOPInstanceUID = hd.UID()
        clean.PatientID, clean.PatientName = name, f"{name}^"  # the caret: a one-component person name
    for keyword in (k for k in IDENTITY if k not in clean):  # highdicom reads each of them; empty: not known
        setattr(clean, keyword, "")
    return clean


def _version(system) -> str:
    return str(system.meta.get("version", ""))


def _segment(number: int, label: str, algorithm) -> hd.seg.SegmentDescription:
    return hd.seg.SegmentDescription(
        segment_number=number,
        segment_label=label,
        segmented_property_category=codes.SCT.AnatomicalStructure,
        segmented_property_type=codes.SCT.Vertebra,
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=algorithm,
    )


def _new_series(number: int, system) -> dict:
    """What the SEG and the SR share as new instances of ovcf's own series: fresh UIDs, the series
    number a PACS sorts them by, and ovcf with its version as the maker."""
    return {
        "series_instance_uid": hd.UID(),
        "series_number": number,
        "sop_instance_uid": hd.UID(),
        "instance_number": 1,
        "manufacturer": "ovcf",
        "software_versions": _version(system),
    }


def build_seg(headers: list[Dataset], labels: np.ndarray, system, mode: str, kind: str = "labelmap") -> hd.seg.Segmentation:
    """The predicted levels as a DICOM SEG on `headers`, one segment per level (numbered up the VerSe ids).

    `labels` are VerSe ids on the series' own voxels as `load_series` reads them (column, row, slice
    in the order of `headers`), with at least one body. `kind` (`SEG_TYPES`): `labelmap` stores one
    frame per slice holding a body, the compact form for levels that never overlap; `binary`, one
    frame per slice and level, is the Segmentation Storage class every SEG reader knows.
    """
    ids = [int(v) for v in np.unique(labels) if v]
    lut = np.zeros(max(max(ids), max(LEVEL_IDS.values())) + 1, np.uint8)
    names = {v: k for k, v in LEVEL_IDS.items()}
    algorithm = hd.AlgorithmIdentificationSequence(
        name="ovcf", version=_version(system), family=codes.cid7162.ArtificialIntelligence
    )
    descriptions = []
    for number, verse in enumerate(ids, start=1):
        lut[verse] = number
        descriptions.append(_segment(number, names.get(verse, str(verse)), algorithm))
    pixels = np.stack([lut[labels[:, :, k].T] for k in range(labels.shape[2])])  # (frames, rows, columns)
    return hd.seg.Segmentation(
        source_images=headers,
        pixel_array=pixels,
        segmentation_type=hd.seg.SegmentationTypeValues[check_seg_type(kind).upper()],
        segment_descriptions=descriptions,
        **_new_series(901, system),
        manufacturer_model_name="ovcf vertebral bodies",
        device_serial_number="0",
        content_label="VERTEBRAE",
        series_description=f"ovcf vertebral bodies ({mode})",
    )


def segment_numbers(seg: Dataset) -> dict[str, int]:
    """Level name -> segment number of a SEG `build_seg` wrote (a LABELMAP's background segment 0 left out)."""
    return {str(s.SegmentLabel): int(s.SegmentNumber) for s in seg.SegmentSequence if int(s.SegmentNumber) > 0}


def vertebra_code(level: str) -> Code:
    """SNOMED CT's code of the vertebra `level` (C1 to L5); a `99OVCF` code for the T13 and L6 it does not name."""
    return getattr(codes.SCT, f"{level}Vertebra", None) or _private(level, f"{level} vertebra")


def _measurements(entry: dict) -> list[hd.sr.Measurement]:
    """The level's acute probability (when it was classified), heights, their ratios and height loss (the group
    names the algorithm that made them all)."""
    found = []
    if "probability" in entry:
        found.append(hd.sr.Measurement(PROBABILITY, float(entry["probability"]), NO_UNITS))
    heights = entry.get("heights") or {}
    for key, (name, unit) in MEASURED.items():
        if heights.get(key) is not None:
            found.append(hd.sr.Measurement(name, float(heights[key]), unit))
    return found


def _evaluations(entry: dict) -> list[hd.sr.QualitativeEvaluation]:
    """The level's decision at the frozen threshold (when classified) and its Genant grade (when the body is whole)."""
    found = []
    if "decision" in entry:
        found.append(hd.sr.QualitativeEvaluation(DECISION, DECISIONS[entry["decision"]]))
    grade = (entry.get("heights") or {}).get("genant_grade")
    if grade is not None:
        found.append(hd.sr.QualitativeEvaluation(GENANT, GENANT_GRADES[int(grade)]))
    return found


def _level_group(entry: dict, seg: Dataset, number: int, series_uid: str, algorithm):
    """TID 1411 for one level: its SEG segment on the CT series, the vertebra, measurements and evaluations."""
    level = entry["level"]
    return hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=hd.UID(), identifier=level),
        referenced_segment=hd.sr.ReferencedSegment(
            sop_class_uid=seg.SOPClassUID,
            sop_instance_uid=seg.SOPInstanceUID,
            segment_number=number,
            source_series=hd.sr.SourceSeriesForSegmentation(series_uid),
        ),
        finding_type=codes.SCT.Vertebra,
        finding_sites=[hd.sr.FindingSite(vertebra_code(level))],
        algorithm_id=algorithm,
        measurements=_measurements(entry),
        qualitative_evaluations=_evaluations(entry),
    )


def _observer(system) -> hd.sr.ObservationContext:
    """ovcf as the device observer; its UID is derived from the version, so one system version is one device."""
    version = _version(system)
    device = hd.sr.DeviceObserverIdentifyingAttributes(
        uid=generate_uid(entropy_srcs=["ovcf", version]), name="ovcf", manufacturer_name="ovcf", model_name=f"ovcf {version}"
    )
    return hd.sr.ObservationContext(
        observer_device_context=hd.sr.ObserverContext(observer_type=codes.DCM.Device, observer_identifying_attributes=device)
    )


def build_sr(headers: list[Dataset], seg: Dataset, levels: list[dict], system, mode: str) -> hd.sr.Comprehensive3DSR:
    """A TID 1500 Measurement Report of predict's `levels`, one group per level that has a segment in `seg`.

    `levels` are `report.json`'s entries of the requested levels and, for every other body found,
    `{"level", "heights"}`. A classified level has its acute probability and decision; one excluded by
    a protocol check, or not requested, only its heights and Genant grade; a level outside the scan has
    no group (no segment to reference). Patient and study are those of `headers` (highdicom copies them
    from the first evidence item), so the SR follows the same `mode` as the SEG built on them. The SR is
    complete, unverified and preliminary: a radiologist's reading, not ovcf, makes it final.
    """
    numbers = segment_numbers(seg)
    threshold = getattr(system, "threshold", None)
    algorithm = hd.sr.AlgorithmIdentification(
        name="ovcf", version=_version(system), parameters=None if threshold is None else [f"threshold={threshold}"]
    )
    series_uid = headers[0].SeriesInstanceUID
    groups = [_level_group(e, seg, numbers[e["level"]], series_uid, algorithm) for e in levels if e["level"] in numbers]
    report = hd.sr.MeasurementReport(
        observation_context=_observer(system), procedure_reported=CT_PROCEDURE, imaging_measurements=groups
    )
    scheme = CodingSchemeIdentificationItem(PRIVATE, name="ovcf codes", responsible_organization="ovcf")
    return hd.sr.Comprehensive3DSR(
        evidence=[*headers, seg],
        content=report,
        **_new_series(902, system),
        is_complete=True,
        series_description=f"ovcf vertebral fractures ({mode})",
        coding_schemes=[scheme],
    )


def write_dicom(
    folder: Path,
    series,
    labels: np.ndarray,
    name: str,
    system,
    mode: str = "research",
    kind: str = "labelmap",
    levels: list[dict] | None = None,
) -> dict[str, str]:
    """Writes `seg.dcm` (`build_seg`) and, given predict's `levels` (see `build_sr`), `sr.dcm` into `folder`.

    `mode` (`SEG_MODES`, named in both SeriesDescriptions): `research` writes the pseudonym `name` and
    new UIDs, so the files can be shared with the pseudonymised results; `pacs` writes the patient's
    identity and references the CT's study, frame of reference, series and instances, so that a PACS
    files them with the CT (they are then patient data). Returns report.json's `files` entries.
    """
    logging.getLogger("highdicom").setLevel(logging.WARNING)  # its INFO lines name the source UIDs
    if not np.any(labels):
        raise CohortError(f"{name}: dicom_seg: the segmenter found no vertebral body, nothing to write")
    headers = source_headers(series, name, system, mode)
    seg = build_seg(headers, labels, system, mode, kind)
    write_atomic(folder / SEG_FILE, seg.save_as)
    files = {"dicom_seg": SEG_FILE}
    if levels is not None:
        write_atomic(folder / SR_FILE, build_sr(headers, seg, levels, system, mode).save_as)
        files["dicom_sr"] = SR_FILE
    return files
