"""Where the vertebral column lies in a CT, the part of a wide scan a segmenter reads, and the pelvis below.

Our phantoms hold a field of view of about 100-160 mm around the spine, and a segmenter trained on
them meets nothing else there. A real abdominal or chest CT is 300-500 mm wide: organs, bowel and
the pelvis then lie in windows the segmenter never saw, and on TotalSegmentator's `example_ct` a
phantom-trained U-Net called those bodies and missed the spine (body Dice 0.000; 0.78 on the window
below). So the segmenter reads a window of the training field's size, centred on the column, found
as a radiologist would: on the torso's left-right midline, the place with the most bone along the
scan's length. Ribs, iliac wings and the sternum lie off the midline or hold less bone.

The pelvis anchors the count from below (`ovcf.data.instances`): `bone_profile` gives, per slice,
the bone beside the column, where the iliac wings lie. On `example_ct` that is 1000-2700 mm2 a
side per slice under L5, 300-700 beside L5 and under 130 beside the ribs of T11-L1.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

BODY_HU = -200.0  # above it: the patient (fat is about -100); below: air and the table's foam
BONE_HU = 200.0  # cortex, posterior elements and iliac wings lie above it; soft tissue and plain organs below
BAND_MM = 25.0  # half-width of the midline band searched for the column, and of the box that refines it
SMOOTH_MM = 8.0  # the bone profile's smoothing along the antero-posterior axis


def _level(hu: float, hu_window) -> float:
    lo, hi = (float(v) for v in hu_window)
    return (hu - lo) / (hi - lo)


def bone_profile(image: np.ndarray, spacing, hu_window) -> np.ndarray:
    """Bone (above `BONE_HU`) per left-right position and axial slice, (X, Z), in mm2 of the slice's plane:
    what `ovcf.data.instances` reads beside the lowest body to tell whether the pelvis lies under it."""
    spacing = np.asarray(spacing, float)
    return (image > _level(BONE_HU, hu_window)).sum(axis=1) * float(spacing[0] * spacing[1])


def spine_window(image: np.ndarray, spacing, hu_window, extent_mm: float) -> tuple[slice, slice]:
    """The X and Y voxel ranges, `extent_mm` wide, centred on the column of one CT.

    Args:
        image: (X, Y, Z) CT windowed to [0, 1] by `hu_window`, RAS (X left-right, Y antero-posterior, Z axial).
        spacing: mm per voxel along X, Y, Z.
        hu_window: the (low, high) HU of the window.
        extent_mm: the window's side; an axis no longer than it is kept whole, as is a scan without a patient.

    Returns:
        (X range, Y range) as slices, the whole axis where nothing is cut.
    """
    spacing = np.asarray(spacing, float)
    size = np.round(extent_mm / spacing[:2]).astype(int)
    whole = (slice(0, image.shape[0]), slice(0, image.shape[1]))
    if all(n <= s for n, s in zip(image.shape[:2], size)):
        return whole
    body = image > _level(BODY_HU, hu_window)
    labels, count = ndimage.label(body)
    if count == 0:
        return whole
    body = labels == 1 + int(np.argmax(ndimage.sum_labels(body, labels, range(1, count + 1))))
    mids = [(x[0] + x[-1]) / 2 for x in (np.flatnonzero(body[:, :, k].any(1)) for k in range(body.shape[2])) if len(x)]
    centre = np.array([np.median(mids), np.flatnonzero(body.any((0, 2)))[[0, -1]].mean()])
    bone = (image > _level(BONE_HU, hu_window)) & body
    band = np.round(BAND_MM / spacing[:2]).astype(int)
    x0, x1 = max(int(centre[0]) - band[0], 0), int(centre[0]) + band[0] + 1
    profile = ndimage.gaussian_filter1d(bone[x0:x1].sum((0, 2)).astype(float), SMOOTH_MM / spacing[1])
    if profile.max() > 0:
        centre[1] = float(np.argmax(profile))
        y0 = max(int(centre[1]) - band[1], 0)
        across = bone[x0:x1, y0 : int(centre[1]) + band[1] + 1].sum((1, 2))
        centre[0] = x0 + float(np.dot(across, np.arange(len(across))) / across.sum())
    out = []
    for axis, (c, s) in enumerate(zip(centre, size)):
        n = image.shape[axis]
        if n <= s:
            out.append(slice(0, n))
            continue
        start = int(np.clip(round(c - s / 2), 0, n - s))
        out.append(slice(start, start + int(s)))
    return out[0], out[1]
