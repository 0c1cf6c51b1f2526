"""A minimal reader of the plain DICOM header that most CT slices have, for speed.

pydicom builds a full Python object per element; for a 20 000-slice export that costs more than
everything else ingest does. This walker reads only what `ovcf.data.dicom` needs from files with
a preamble, little-endian transfer syntax, one frame and pixel data, skipping sequences without
decoding them. Anything else (no preamble, big endian, deflate, multi-frame, Modality LUT,
DICOMDIR, a structure it does not expect) returns None, and the caller falls back to pydicom;
tests check that both give the same header.
"""

from __future__ import annotations

import struct

from pydicom.datadict import tag_for_keyword

EXPLICIT_LE, IMPLICIT_LE = "1.2.840.10008.1.2.1", "1.2.840.10008.1.2"
LONG_VRS = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}
NUMBERS = {"Rows", "Columns", "BitsAllocated", "BitsStored", "PixelRepresentation", "SamplesPerPixel"}
PADDING = {"PixelPaddingValue", "PixelPaddingRangeLimit"}
TEXT = {
    "SOPClassUID", "SOPInstanceUID", "PatientID", "StudyInstanceUID", "SeriesInstanceUID", "SeriesNumber", "Modality",
    "FrameOfReferenceUID", "ImageType", "AcquisitionDate", "StudyDate", "SeriesDate", "GantryDetectorTilt",
    "PhotometricInterpretation", "LossyImageCompression", "NumberOfFrames", "RescaleSlope", "RescaleIntercept",
    "ImageOrientationPatient", "ImagePositionPatient", "PixelSpacing", "SliceThickness", "SpecificCharacterSet",
}  # fmt: skip
FALLBACK = {
    "ModalityLUTSequence", "PerFrameFunctionalGroupsSequence", "SharedFunctionalGroupsSequence", "DirectoryRecordSequence",
}  # fmt: skip
WANTED = {tag_for_keyword(k): k for k in NUMBERS | PADDING | TEXT | FALLBACK}
PIXEL_DATA = 0x7FE00010
ITEM, ITEM_END, SEQUENCE_END = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD


class _Unusual(Exception):
    """Something this walker does not handle: use pydicom."""


class RawHeader:
    """The header fields of one file, answering the few Dataset calls `ovcf.data.dicom` makes."""

    def __init__(self, values: dict[str, tuple[bytes, bytes | None]], transfer_syntax: str, sop_class: str):
        self.values = values
        self.file_meta = {"TransferSyntaxUID": transfer_syntax, "MediaStorageSOPClassUID": sop_class}
        self.explicit = transfer_syntax == EXPLICIT_LE

    def __contains__(self, keyword: str) -> bool:
        return keyword in self.values

    def __getattr__(self, keyword: str):
        if keyword in NUMBERS and keyword in self.values:
            return self.get(keyword)
        raise AttributeError(keyword)

    def get(self, keyword: str, default=None):
        if keyword not in self.values:
            return default
        raw, vr = self.values[keyword]
        if keyword in NUMBERS:
            return struct.unpack("<H", raw[:2])[0] if len(raw) >= 2 else default
        if keyword in PADDING:
            return struct.unpack("<h" if vr == b"SS" else "<H", raw[:2])[0] if len(raw) >= 2 else default
        return self.text(keyword)

    def text(self, keyword: str):
        """Like `ovcf.data.dicom._get`: a str, or a list of str for several values."""
        if keyword not in self.values:
            return None
        raw = self.values[keyword][0]
        try:
            text = raw.decode("utf-8") if keyword == "PatientID" else raw.decode("ascii")
        except UnicodeDecodeError:
            raise _Unusual(keyword) from None  # a character set only pydicom decodes right
        text = text.strip("\x00 ")
        return text.split("\\") if "\\" in text else text


def _element(data: bytes, pos: int, explicit: bool) -> tuple[int, bytes | None, int, int]:
    """(tag, VR, value length, header length) of the element at `pos`."""
    group, number = struct.unpack_from("<HH", data, pos)
    tag = (group << 16) | number
    if group == 0xFFFE:  # item and delimiters have no VR
        return tag, None, struct.unpack_from("<I", data, pos + 4)[0], 8
    if not explicit:
        return tag, None, struct.unpack_from("<I", data, pos + 4)[0], 8
    vr = data[pos + 4 : pos + 6]
    if vr in LONG_VRS:
        return tag, vr, struct.unpack_from("<I", data, pos + 8)[0], 12
    if not vr.isalpha():
        raise _Unusual("bad VR")
    return tag, vr, struct.unpack_from("<H", data, pos + 6)[0], 8


def _skip_undefined(data: bytes, pos: int, explicit: bool, depth: int = 0) -> int:
    """Position after an undefined-length sequence (or item) starting its content at `pos`."""
    if depth > 8:
        raise _Unusual("deep nesting")
    while pos + 8 <= len(data):
        tag, _, length, head = _element(data, pos, explicit)
        pos += head
        if tag in (SEQUENCE_END, ITEM_END):
            return pos
        if length == 0xFFFFFFFF:
            pos = _skip_undefined(data, pos, explicit, depth + 1)
        else:
            pos += length
    raise _Unusual("unterminated sequence")


def read_raw_header(data: bytes) -> tuple[RawHeader, int] | None:
    """The header and the offset of the pixel data element, or None when pydicom must read the file."""
    try:
        return _walk(data)
    except (_Unusual, struct.error, IndexError):
        return None


def _walk(data: bytes) -> tuple[RawHeader, int] | None:
    if len(data) < 144 or data[128:132] != b"DICM":
        return None
    pos, meta = 132, {}
    while pos + 8 <= len(data) and data[pos : pos + 2] == b"\x02\x00":
        tag, _, length, head = _element(data, pos, True)
        if length == 0xFFFFFFFF:
            return None
        meta[tag] = data[pos + head : pos + head + length].decode("ascii", "replace").strip("\x00 ")
        pos += head + length
    ts = meta.get(0x00020010, "")
    if ts not in (EXPLICIT_LE, IMPLICIT_LE):
        return None
    explicit = ts == EXPLICIT_LE
    values: dict[str, tuple[bytes, bytes | None]] = {}
    while pos + 8 <= len(data):
        tag, vr, length, head = _element(data, pos, explicit)
        if tag == PIXEL_DATA:
            if values.keys() & FALLBACK or "Rows" not in values or "Columns" not in values:
                return None
            frames = values.get("NumberOfFrames")
            if frames is not None and frames[0].strip(b"\x00 ") not in (b"", b"1"):
                return None
            return RawHeader(values, ts, meta.get(0x00020002, "")), pos
        if length == 0xFFFFFFFF:
            if tag in WANTED:
                return None
            pos = _skip_undefined(data, pos + head, explicit)
            continue
        if tag in WANTED:
            values[WANTED[tag]] = (data[pos + head : pos + head + length], vr)
        pos += head + length
    return None  # no pixel data: pydicom sorts out what kind of file it is
