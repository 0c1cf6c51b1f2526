"""Every transfer syntax of cornerstone-testImages decodes with ovcf's permissive decoders alone.

ovcf is Apache-2.0, so its required decoders are permissive (GDCM, pyjpegls, pylibjpeg-openjpeg,
pylibjpeg-rle, Pillow) and the GPL-3.0 pylibjpeg-libjpeg is not among them. The folder holds one
real GE CT slice (`CTImage.dcm`, uncompressed) re-encoded in every transfer syntax, so each
lossless sibling must give back the raw slice bit for bit, a lossy one must stay within its
syntax's error, and every decoder pydicom has for a lossless syntax must agree with the others
(the fallbacks are what runs where GDCM is missing or fails). Nothing here depends on which
decoder produced a reference: the reference is the uncompressed file.
"""

from __future__ import annotations

import numpy as np
import pytest
from conftest import REAL
from pydicom import dcmread
from pydicom.pixels import get_decoder, pixel_array
from pydicom.uid import (
    JPEG2000,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)

from ovcf.data import decoders
from ovcf.data.dicom import read_frames, read_header
from ovcf.data.series import SeriesChecks, group_series, load_series

FOLDER = REAL / "cornerstone-testImages"
pytestmark = pytest.mark.skipif(not FOLDER.is_dir(), reason=f"cornerstone test images not found at {FOLDER}")

RAW = "CTImage.dcm"  # implicit VR little endian: the slice every CTImage.dcm_* sibling re-encodes
ENCAPSULATED_LOSSLESS = {JPEGLossless, JPEGLosslessSV1, JPEGLSLossless, JPEG2000Lossless, RLELossless}
LOSSLESS = {
    ImplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
} | ENCAPSULATED_LOSSLESS
# Lossy siblings: largest and mean |HU - raw| allowed. JPEG Extended also requantises the 16-bit
# slice to 12 bits (slope 2); this file's JPEG-LS stream has NEAR=1, so 1 HU is its exact bound.
LOSSY_HU = {JPEGExtended12Bit: (40.0, 5.0), JPEGLSNearLossless: (1.0, 1.0), JPEG2000: (5.0, 1.0)}
# Retired JPEG processes 6-8 and 10-12: no pydicom decoder reads them (the series reader names them
# unsupported_transfer_syntax). Baseline .50 decodes, to 8 bits that the series reader rejects (lossy_8bit).
NO_DECODER = ("1.2.840.10008.1.2.4.53", "1.2.840.10008.1.2.4.55")
# The files that are not siblings of RAW: their (frames, rows, columns), or the error reading raises.
OTHERS = {
    "CT0012.fragmented_no_bot_jpeg_baseline.51.dcm": (2, 512, 512),  # 12-bit JPEG Extended, no offset table
    "CT1_J2KR": (1, 512, 512),
    "CT2_J2KR": (1, 512, 512),
    "no-pixel-data.dcm": ValueError,  # a structured report
    "no-pixel-spacing.dcm": (1, 600, 800),  # 8-bit RLE
}


def _files() -> list[str]:
    return sorted(p.name for p in FOLDER.iterdir() if p.name != "LICENSE.txt") if FOLDER.is_dir() else []


def _expected(name: str):
    """(frames, rows, columns) that reading `name` gives, the error it raises, or None: not listed."""
    if name == RAW or name.startswith(RAW + "_"):
        return NotImplementedError if name.endswith(tuple(f"_{uid}.dcm" for uid in NO_DECODER)) else (1, 512, 512)
    return OTHERS.get(name)


def _syntax(name: str) -> str:
    return str(dcmread(FOLDER / name, stop_before_pixels=True).file_meta.TransferSyntaxUID)


def _hu(name: str) -> np.ndarray:
    """The slice in HU through the whole series reader (rescale, padding, validation)."""
    (series,) = group_series(read_header(str(FOLDER / name))[0])
    return load_series(series, SeriesChecks(min_slices=1)).array


@pytest.fixture(scope="module")
def raw():
    return read_frames(str(FOLDER / RAW))[0], _hu(RAW)


def test_every_file_is_listed():
    """A file added to the folder must be given its expected outcome here."""
    assert [n for n in _files() if _expected(n) is None] == []


@pytest.mark.parametrize("name", _files())
def test_file_decodes_to_its_shape_or_is_refused(name):
    expected = _expected(name)
    if isinstance(expected, type):
        with pytest.raises(expected):
            read_frames(str(FOLDER / name))
        return
    stored, _ = read_frames(str(FOLDER / name))
    assert stored.shape == expected


DECODED = [n for n in _files() if isinstance(_expected(n), tuple)]
SIBLINGS = [n for n in DECODED if n.startswith(RAW + "_")]


@pytest.mark.parametrize("name", [n for n in SIBLINGS if _syntax(n) in LOSSLESS])
def test_lossless_sibling_equals_the_raw_slice(name, raw):
    stored, _ = read_frames(str(FOLDER / name))
    np.testing.assert_array_equal(stored, raw[0])  # values: the big-endian file's dtype is >i2
    np.testing.assert_array_equal(_hu(name), raw[1])


@pytest.mark.parametrize("name", [n for n in SIBLINGS if _syntax(n) in LOSSY_HU])
def test_lossy_sibling_stays_within_its_error(name, raw):
    most, mean = LOSSY_HU[_syntax(name)]
    error = np.abs(_hu(name) - raw[1])
    assert error.max() <= most and error.mean() <= mean, (error.max(), error.mean())


@pytest.mark.parametrize("name", [n for n in DECODED if _syntax(n) in ENCAPSULATED_LOSSLESS])
def test_every_decoder_of_a_lossless_syntax_agrees(name):
    """GDCM comes first in pydicom's order; every fallback must give the same pixels."""
    stored, _ = read_frames(str(FOLDER / name))
    plugins = get_decoder(_syntax(name)).available_plugins
    assert plugins
    for plugin in plugins:
        decoded = pixel_array(str(FOLDER / name), decoding_plugin=plugin)
        np.testing.assert_array_equal(decoded.reshape(stored.shape), stored, err_msg=plugin)


def test_12bit_jpeg_extended_needs_ovcf_plugin():
    """pydicom's permissive plugins refuse 12-bit JPEG Extended; ovcf's GDCM plugin reads it.

    If this starts failing because GDCM or Pillow decode it, `ovcf.data.decoders` can go.
    """
    path = str(FOLDER / "CTImage.dcm_JPEGProcess2_4TransferSyntax_1.2.840.10008.1.2.4.51.dcm")
    for plugin in ("gdcm", "pillow"):
        with pytest.raises(RuntimeError, match="12-bit"):
            pixel_array(path, decoding_plugin=plugin)
    assert decoders.plugin_for(dcmread(path, stop_before_pixels=True)) == decoders.LABEL
    stored, _ = read_frames(str(FOLDER / "CT0012.fragmented_no_bot_jpeg_baseline.51.dcm"))
    assert 0 < stored.min() and stored.max() < 4096 and not np.array_equal(stored[0], stored[1])
