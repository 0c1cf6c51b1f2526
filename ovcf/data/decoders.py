"""A pydicom decoding plugin for 12-bit JPEG Extended (1.2.840.10008.1.2.4.51) through GDCM.

ovcf's required decoders are all permissively licensed: GDCM (JPEG, JPEG-LS, JPEG 2000), pyjpegls,
pylibjpeg-openjpeg, pylibjpeg-rle and Pillow. The one pydicom plugin that decodes 12-bit lossy JPEG
is pylibjpeg-libjpeg, which is GPL-3.0 and so cannot be a dependency of an Apache-2.0 package.
GDCM's wheel does carry a 12-bit JPEG codec, but pydicom's own gdcm plugin refuses 12-bit JPEG
Extended outright. This plugin calls GDCM's 12-bit codec directly. Its output equals libjpeg-turbo's
(and DCMTK's, both IJG-derived); pylibjpeg-libjpeg's differs by at most one stored value on a few
per cent of pixels, as two conforming decoders of a lossy stream may.

The plugin follows pydicom's plugin interface (`is_available`, `DECODER_DEPENDENCIES`, a frame
decoding function); `register` adds it once, and `read_frames` asks for it by name (`plugin_for`)
so that the pixels do not depend on which optional decoders happen to be installed.
"""

from __future__ import annotations

from pydicom.pixels import get_decoder
from pydicom.uid import JPEGExtended12Bit

try:
    import gdcm
except ImportError:  # python-gdcm is a required dependency; without it the plugin is simply unavailable
    gdcm = None

LABEL = "ovcf-gdcm-12bit"
DECODER_DEPENDENCIES = {JPEGExtended12Bit: ("python-gdcm>=3.0.10",)}


def is_available(uid: str) -> bool:
    """Whether the plugin can decode `uid` here (pydicom's plugin interface)."""
    return gdcm is not None and uid in DECODER_DEPENDENCIES


def decode_frame(src: bytes, runner) -> bytes:
    """One 12-bit grayscale JPEG Extended frame -> its stored values, two bytes each.

    Telling GDCM 12 bits allocated picks its 12-bit codec at once; 16 would first try the 16-bit
    codec, which fails and prints "Unsupported JPEG data precision 12" to stderr for every frame.
    The buffer GDCM returns still holds each value in two bytes, as pydicom expects.

    Args:
        src: The JPEG stream of one frame.
        runner: pydicom's DecodeRunner: rows, columns, photometric interpretation, sign.

    Returns:
        The frame's stored values, little-endian 16-bit.

    Raises:
        ValueError: Not a 12-bit grayscale frame, or GDCM could not decode it (pydicom reports it).
    """
    if runner.samples_per_pixel != 1 or runner.bits_stored <= 8:
        raise ValueError(f"{LABEL} decodes 12-bit grayscale JPEG Extended only")
    fragment = gdcm.Fragment()
    fragment.SetByteStringValue(src)
    fragments = gdcm.SequenceOfFragments.New()
    fragments.AddFragment(fragment)
    element = gdcm.DataElement(gdcm.Tag(0x7FE0, 0x0010))
    element.SetValue(fragments.__ref__())
    image = gdcm.Image()
    image.SetNumberOfDimensions(2)
    image.SetDimensions((runner.columns, runner.rows, 1))
    image.SetDataElement(element)
    kind = gdcm.PhotometricInterpretation.GetPIType(str(runner.photometric_interpretation))
    image.SetPhotometricInterpretation(gdcm.PhotometricInterpretation(kind))
    image.SetTransferSyntax(gdcm.TransferSyntax(gdcm.TransferSyntax.JPEGExtendedProcess2_4))
    image.SetPixelFormat(gdcm.PixelFormat(1, 12, 12, 11, runner.pixel_representation))
    buffer = image.GetBuffer()  # GDCM hands its char* back as str; None where decoding failed
    frame = b"" if buffer is None else buffer.encode("utf-8", "surrogateescape")
    if len(frame) != 2 * runner.rows * runner.columns:
        raise ValueError(f"GDCM could not decode the 12-bit JPEG frame ({len(frame)} bytes for {runner.rows}x{runner.columns})")
    return frame


def register() -> None:
    """Add the plugin to pydicom's JPEG Extended decoder, once per process."""
    try:
        get_decoder(JPEGExtended12Bit).add_plugin(LABEL, (__name__, "decode_frame"))
    except ValueError:  # already registered
        pass


def plugin_for(ds) -> str:
    """The decoding plugin to ask pydicom for: this one for a 12-bit grayscale JPEG Extended data set,
    else "" (pydicom's own order, GDCM first). Asking by name also keeps pydicom from logging the
    refusal of each plugin before it, for every frame."""
    meta = getattr(ds, "file_meta", None)
    ts = meta.get("TransferSyntaxUID") if meta else None
    grey_12bit = int(ds.get("SamplesPerPixel") or 1) == 1 and int(ds.get("BitsStored") or 8) > 8
    return LABEL if ts == JPEGExtended12Bit and grey_12bit and LABEL in get_decoder(ts).available_plugins else ""
