"""One DICOM file -> the header fields series assembly needs, and its frames in HU.

A PACS export holds more than CT slices: files without extension or preamble, DICOMDIRs, dose
reports, text files, DICOM files damaged in transfer. `read_header` sorts each file into one of
`FILE_KINDS` without decoding pixels, and expands an enhanced multi-frame image into one
`SliceHeader` per frame (geometry and rescale from its functional groups), so that the rest of the
reader sees slices only.
"""

from __future__ import annotations

import hashlib
import io
import os
import stat
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.errors import InvalidDicomError
from pydicom.pixels import apply_modality_lut
from pydicom.uid import UID

from ovcf.data import decoders
from ovcf.data.rawdicom import RawHeader, read_raw_header

# unreadable: a DICOM file whose header cannot be read (damaged, cut short), or any file that cannot be opened
FILE_KINDS = ("image", "non_dicom", "dicomdir", "no_pixels", "unreadable")
UNCOMPRESSED = {"1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.1.99", "1.2.840.10008.1.2.2"}
LOSSY_8BIT = {"1.2.840.10008.1.2.4.50"}  # JPEG baseline: 8 bits cannot hold HU
# JPEG extended, JPEG-LS near-lossless, JPEG 2000 and HTJ2K (lossy variants): decodable, HU approximate
LOSSY = {"1.2.840.10008.1.2.4.51", "1.2.840.10008.1.2.4.81", "1.2.840.10008.1.2.4.91", "1.2.840.10008.1.2.4.203"}
decoders.register()  # 12-bit JPEG Extended through GDCM: the permissive decoders lack it otherwise


@dataclass
class SliceHeader:
    """What series assembly needs of one slice (one file, or one frame of a multi-frame file)."""

    path: str
    digest: str  # content hash of the whole file: exact duplicates and the ingest cache use it
    patient_id: str
    study_uid: str
    series_uid: str  # SeriesInstanceUID, or a stand-in built from other tags when it is empty
    series_number: str
    modality: str
    orientation: tuple[float, ...] | None
    position: tuple[float, ...] | None
    shape: tuple[int, int]
    pixel_spacing: tuple[float, float] | None
    thickness: float | None
    image_type: tuple[str, ...]
    date: str
    transfer_syntax: str
    sop_uid: str = ""
    frame: int = -1  # index into a multi-frame file's frames; -1 for a single-frame file
    frames: int = 1
    rescale: tuple[float, float] = (1.0, 0.0)  # slope, intercept
    modality_lut: bool = False  # a Modality LUT Sequence replaces rescale
    tilt: float = 0.0  # GantryDetectorTilt, degrees
    bits_stored: int = 16
    samples: int = 1
    photometric: str = "MONOCHROME2"
    lossy: bool = False  # lossy compression, now or before (LossyImageCompression 01)
    padding: tuple[int, int] | None = None  # PixelPaddingValue (and range limit): stored values that are air
    pixel_offset: int = -1  # where native little-endian pixels start in the file; -1: decode with pydicom
    pixel_dtype: str = ""  # their numpy dtype when pixel_offset >= 0


def _floats(value, n: int) -> tuple[float, ...] | None:
    try:
        out = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        return None
    return out if len(out) == n and all(np.isfinite(out)) else None


def _float(value, default: float | None = None) -> float | None:
    try:
        out = float(value)
    except (TypeError, ValueError):
        return default
    return out if np.isfinite(out) else default


def _as_list(value) -> list:
    if value is None:
        return []
    return [value] if isinstance(value, str) else list(value)


def _text(value) -> str:
    return "" if value is None else str(value).strip().strip("\x00").strip()


def _parse(data: bytes):
    """The dataset without pixels and where reading stopped (at the pixel data element, if any).

    Files without preamble or file meta are read too.
    """
    fp = io.BytesIO(data)
    try:
        ds = pydicom.dcmread(fp, stop_before_pixels=True)
    except InvalidDicomError:
        # No preamble: accept only what starts like a data set (group 0002 or 0008 tags).
        if len(data) < 8 or data[:2] not in (b"\x02\x00", b"\x08\x00", b"\x00\x02", b"\x00\x08"):
            raise
        fp = io.BytesIO(data)
        ds = pydicom.dcmread(fp, stop_before_pixels=True, force=True)
    return ds, fp.tell()


def _native_pixels(ds, data: bytes, pos: int, transfer_syntax: str) -> tuple[int, str]:
    """Offset and dtype of uncompressed little-endian single-frame pixels, so that reading them
    later needs no second parse of the header; (-1, "") whenever anything is unusual."""
    bits = ds.get("BitsAllocated")
    if (
        transfer_syntax not in ("1.2.840.10008.1.2", "1.2.840.10008.1.2.1")
        or bits not in (8, 16)
        or data[pos : pos + 4] != b"\xe0\x7f\x10\x00"
    ):
        return -1, ""
    if transfer_syntax == "1.2.840.10008.1.2.1":
        if data[pos + 4 : pos + 6] not in (b"OW", b"OB"):
            return -1, ""
        length, start = int.from_bytes(data[pos + 8 : pos + 12], "little"), pos + 12
    else:
        length, start = int.from_bytes(data[pos + 4 : pos + 8], "little"), pos + 8
    if length != int(ds.Rows) * int(ds.Columns) * bits // 8 or start + length > len(data):
        return -1, ""
    signed = int(ds.get("PixelRepresentation") or 0) == 1
    return start, f"<{'i' if signed else 'u'}{bits // 8}"


_TEXT_VRS = {"AE", "AS", "CS", "DA", "DS", "DT", "IS", "LO", "SH", "TM", "UI"}


def _get(ds, keyword: str):
    """A plain-text tag's value straight from its raw bytes (a str, or a list for several values).

    pydicom's conversion validates and wraps every value; for the two dozen tags of every slice
    of a large export that costs more than parsing the file. Other VRs go through pydicom.
    """
    if isinstance(ds, RawHeader):
        return ds.text(keyword)
    tag = tag_for_keyword(keyword)
    try:
        elem = ds.get_item(tag)
    except KeyError:
        return None
    if elem is None:
        return None
    value = elem.value
    if isinstance(value, (bytes, bytearray)) and (elem.VR or dictionary_VR(tag)) in _TEXT_VRS:
        text = bytes(value).decode("latin-1").strip("\x00 ")
        return text.split("\\") if "\\" in text else text
    return ds.get(keyword)


def _group_item(ds, frame: int, sequence: str, attr: str):
    """`attr` from the per-frame functional group of `frame`, else from the shared group."""
    for groups, index in (("PerFrameFunctionalGroupsSequence", frame), ("SharedFunctionalGroupsSequence", 0)):
        try:
            value = getattr(getattr(ds, groups)[index], sequence)[0].get(attr)
        except (AttributeError, IndexError, KeyError, TypeError):
            continue
        if value is not None:
            return value
    return None


def read_header(path: str) -> tuple[list[SliceHeader], str]:
    """The slices of one file without its pixels, and the file's kind (one of `FILE_KINDS`).

    A file with the DICOM marker whose header fails is `unreadable`, not `non_dicom`: it is most
    likely a slice lost in transfer, and the series it leaves with a gap must say so.
    """
    try:
        with open(path, "rb") as fh:
            data = fh.read()
    except OSError:
        return [], "unreadable"
    failed = "unreadable" if data[128:132] == b"DICM" else "non_dicom"
    try:
        ds, pos = read_raw_header(data) or _parse(data)  # the fast walker, else pydicom
    except Exception:  # noqa: BLE001 - a broken or foreign file raises anything; it is skipped and counted
        return [], failed
    try:
        return _slices(ds, path, hashlib.blake2b(data, digest_size=16).hexdigest(), data, pos)
    except Exception:  # noqa: BLE001 - garbage that parsed as tags (force=True): not a usable image
        return [], failed


def _damaged(ds, data: bytes, sop_class: str) -> bool:
    """Whether a file that yields no image is a damaged DICOM file rather than an object without pixels.

    pydicom reads a header cut short or overwritten without complaint, as a data set that simply
    ends early. But a Part 10 file (DICM marker) always has its transfer syntax in the file meta
    group, and an image SOP class always has pixel data: lacking either, the header is damaged.
    """
    meta = getattr(ds, "file_meta", None)
    if data[128:132] == b"DICM" and not (meta and meta.get("TransferSyntaxUID")):
        return True
    return bool(sop_class) and "Image Storage" in UID(sop_class).name


def _slices(ds, path: str, digest: str, data: bytes, pos: int) -> tuple[list[SliceHeader], str]:
    meta = getattr(ds, "file_meta", None)
    sop_class = _text(_get(ds, "SOPClassUID") or (meta.get("MediaStorageSOPClassUID") if meta else None))
    if sop_class == "1.2.840.10008.1.3.10" or "DirectoryRecordSequence" in ds:
        return [], "dicomdir"
    ts = _text(meta.get("TransferSyntaxUID")) if meta else "1.2.840.10008.1.2"
    # Reading stopped at (7FE0,xxxx); a deflated data set cannot be checked in the raw bytes.
    has_pixels = ts == "1.2.840.10008.1.2.1.99" or data[pos : pos + 2] in (b"\xe0\x7f", b"\x7f\xe0")
    if "Rows" not in ds or "Columns" not in ds or not has_pixels:
        if _damaged(ds, data, sop_class):
            return [], "unreadable"
        return [], "no_pixels" if (sop_class or "Modality" in ds) else "non_dicom"
    series_uid = _text(_get(ds, "SeriesInstanceUID"))
    series_number = _text(_get(ds, "SeriesNumber"))
    modality = _text(_get(ds, "Modality")).upper()
    padding = ds.get("PixelPaddingValue")
    limit = ds.get("PixelPaddingRangeLimit")
    padding = (padding, limit if isinstance(limit, int) else padding) if isinstance(padding, int) else None
    if padding is not None and int(ds.get("PixelRepresentation") or 0) == 1:  # stored as US although pixels are signed
        bits = int(ds.get("BitsAllocated") or 16)
        padding = tuple(v - (1 << bits) if v >= 1 << (bits - 1) else v for v in padding)
    if not series_uid:  # empty or missing UID: series number, modality and frame of reference stand in
        series_uid = f"(no UID) #{series_number}/{modality}/{_text(_get(ds, 'FrameOfReferenceUID'))}"
    common = dict(
        path=path,
        digest=digest,
        patient_id=_text(ds.get("PatientID")).replace(" ", ""),
        study_uid=_text(_get(ds, "StudyInstanceUID")),
        series_uid=series_uid,
        series_number=series_number,
        modality=modality,
        shape=(int(ds.Rows), int(ds.Columns)),
        image_type=tuple(_text(v).upper() for v in _as_list(_get(ds, "ImageType"))),
        date=_text(_get(ds, "AcquisitionDate") or _get(ds, "StudyDate") or _get(ds, "SeriesDate")),
        transfer_syntax=ts,
        sop_uid=_text(_get(ds, "SOPInstanceUID")),
        modality_lut="ModalityLUTSequence" in ds,
        tilt=_float(_get(ds, "GantryDetectorTilt"), 0.0),
        bits_stored=int(ds.get("BitsStored") or 16),
        samples=int(ds.get("SamplesPerPixel") or 1),
        photometric=_text(_get(ds, "PhotometricInterpretation")).upper(),
        padding=None if padding is None else tuple(sorted(padding)),
        lossy=_text(_get(ds, "LossyImageCompression")) == "01",
    )
    frames = int(_float(_get(ds, "NumberOfFrames"), 1) or 1)
    if frames > 1 or "PerFrameFunctionalGroupsSequence" in ds:
        if frames > _max_frames(ds, data, pos, ts):  # a corrupt count must not expand into millions of slices
            return [], "unreadable"
        return [_frame(ds, i, frames, common) for i in range(frames)], "image"
    slope, intercept = _float(_get(ds, "RescaleSlope"), 1.0), _float(_get(ds, "RescaleIntercept"), 0.0)
    offset, dtype = _native_pixels(ds, data, pos, common["transfer_syntax"]) if not common["modality_lut"] else (-1, "")
    header = SliceHeader(
        **common,
        orientation=_floats(_get(ds, "ImageOrientationPatient"), 6),
        position=_floats(_get(ds, "ImagePositionPatient"), 3),
        pixel_spacing=_floats(_get(ds, "PixelSpacing"), 2),
        thickness=_float(_get(ds, "SliceThickness")),
        rescale=(slope, intercept),
        pixel_offset=offset,
        pixel_dtype=dtype,
    )
    return [header], "image"


def _max_frames(ds, data: bytes, pos: int, ts: str) -> int:
    """How many frames the file can hold: its per-frame groups, or what its pixel bytes allow."""
    if "PerFrameFunctionalGroupsSequence" in ds:
        return len(ds.PerFrameFunctionalGroupsSequence)
    if ts in UNCOMPRESSED:
        samples, depth = int(ds.get("SamplesPerPixel") or 1), max(int(ds.get("BitsAllocated") or 16) // 8, 1)
        return (len(data) - pos) // max(int(ds.Rows) * int(ds.Columns) * samples * depth, 1)
    return 5000


def _frame(ds, i: int, frames: int, common: dict) -> SliceHeader:
    slope = _group_item(ds, i, "PixelValueTransformationSequence", "RescaleSlope")
    intercept = _group_item(ds, i, "PixelValueTransformationSequence", "RescaleIntercept")
    return SliceHeader(
        **common,
        orientation=_floats(_group_item(ds, i, "PlaneOrientationSequence", "ImageOrientationPatient"), 6),
        position=_floats(_group_item(ds, i, "PlanePositionSequence", "ImagePositionPatient"), 3),
        pixel_spacing=_floats(_group_item(ds, i, "PixelMeasuresSequence", "PixelSpacing"), 2),
        thickness=_float(_group_item(ds, i, "PixelMeasuresSequence", "SliceThickness")),
        rescale=(_float(slope, _float(ds.get("RescaleSlope"), 1.0)), _float(intercept, _float(ds.get("RescaleIntercept"), 0.0))),
        frame=i,
        frames=frames,
    )


def read_frames(path: str) -> tuple[np.ndarray, object]:
    """Decoded stored values of a file, always (frames, rows, columns), and its dataset."""
    ds = pydicom.dcmread(path, force=True)
    if "PixelData" not in ds and "FloatPixelData" not in ds:
        raise ValueError("the file has no pixel data")
    plugin = decoders.plugin_for(ds)
    if plugin:
        ds.pixel_array_options(decoding_plugin=plugin)
    stored = ds.pixel_array
    frames = int(_float(ds.get("NumberOfFrames"), 1) or 1)
    return (stored if frames > 1 else stored[None]), ds


def read_native(header: SliceHeader) -> np.ndarray:
    """Stored values of a plain uncompressed slice straight from its bytes (the fast path)."""
    rows, cols = header.shape
    with open(header.path, "rb") as fh:
        fh.seek(header.pixel_offset)
        raw = np.frombuffer(fh.read(rows * cols * np.dtype(header.pixel_dtype).itemsize), header.pixel_dtype)
    if raw.size != rows * cols:
        raise ValueError(f"pixel data truncated: {raw.size} of {rows * cols} values")
    raw = raw.reshape(rows, cols)
    bits = raw.dtype.itemsize * 8
    if header.bits_stored < bits:  # unused high bits (overlays in old files) are not part of the value
        shift = bits - header.bits_stored
        if raw.dtype.kind == "i":
            return (raw << shift) >> shift
        return raw & ((1 << header.bits_stored) - 1)
    return raw


def to_hu(stored: np.ndarray, header: SliceHeader, ds=None) -> np.ndarray:
    """Stored values of one frame -> HU; pixel padding (outside the reconstruction circle) is air."""
    if header.modality_lut:
        hu = np.asarray(apply_modality_lut(stored, ds), np.float32)
    else:
        slope, intercept = header.rescale
        hu = stored.astype(np.float32) * np.float32(slope) + np.float32(intercept)
    if header.padding is not None:
        lo, hi = header.padding
        hu[(stored >= lo) & (stored <= hi)] = -1024.0
    return hu


def find_files(root: Path) -> tuple[list[str], Counter]:
    """Every regular file under `root`, sorted, whatever the nesting or extension; and what was skipped.

    Links are followed, to files and folders alike, so that an export assembled from links reads
    as its targets; a folder reached twice is read once. One bad entry must not stop a cohort, so
    what cannot be read is skipped and counted instead: `broken_link` (a link to nothing, a link
    to itself, or a folder link to an ancestor of its own folder, which would loop), `non_dicom`
    (pipes, sockets, devices: reading one could block forever). A missing `root` holds nothing.
    """
    files, skipped, walked = [], Counter(), {os.path.realpath(root)}
    for folder, dirs, names in os.walk(root, followlinks=True):
        here, keep = os.path.realpath(folder), []
        for name in sorted(dirs):
            target = os.path.realpath(os.path.join(folder, name))
            if os.path.commonpath([here, target]) == target:
                skipped["broken_link"] += 1
            elif target not in walked:
                walked.add(target)
                keep.append(name)
        dirs[:] = keep
        for name in names:
            path = os.path.join(folder, name)
            try:
                mode = os.stat(path).st_mode
            except OSError:  # a dangling link, or a link that loops
                skipped["broken_link"] += 1
                continue
            if stat.S_ISREG(mode):
                files.append(path)
            else:
                skipped["non_dicom"] += 1
    return sorted(files), skipped


def list_files(root: Path) -> list[str]:
    """Every regular file under `root`, sorted (see `find_files` for links and what is skipped)."""
    return find_files(root)[0]
