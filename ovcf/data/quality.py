"""Protocol exclusions read from the CT itself: cement or metal, image quality, level in view.

All three work on the CT's own voxels in a box around the fractured body, so they need no
training and behave the same on any scanner: thresholds are in HU and millimetres (the `ingest`
config group), never in voxels.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from ovcf.contract import LEVEL_IDS, LEVEL_ORDER
from ovcf.data.volume import Volume

LEVEL_PITCH_MM = 28.0  # typical centre-to-centre distance of adjacent thoraco-lumbar bodies


@dataclass(frozen=True)
class QualityChecks:
    """Thresholds of the CT-based exclusions."""

    implant_hu: float = 2200.0  # bone cement (PMMA with barium) and metal read above this; bone below
    implant_min_ml: float = 0.1  # dense volume in and around the body that counts as an implant
    implant_margin_mm: float = 5.0  # "next to" the fractured body
    max_noise_hu: float = 80.0  # soft-tissue noise (robust SD of the in-plane high-pass) above this is inadequate
    noise_margin_mm: float = 20.0  # noise is measured in soft tissue within this distance of the body
    max_slice_mm: float = 5.0  # slices further apart than this cannot show a fracture line


def _box(volume: Volume, voxels: np.ndarray, margin_mm: float) -> tuple[slice, ...]:
    pad = np.ceil(margin_mm / volume.spacing).astype(int)
    lo = np.maximum(voxels.min(0) - pad, 0)
    hi = np.minimum(voxels.max(0) + pad + 1, volume.array.shape)
    return tuple(slice(a, b) for a, b in zip(lo, hi))


def implant_ml(volume: Volume, voxels: np.ndarray, checks: QualityChecks) -> float:
    """Millilitres above `implant_hu` in the body (voxel indices `voxels`) and `implant_margin_mm` around it."""
    box = volume.array[_box(volume, voxels, checks.implant_margin_mm)]
    dense = box > checks.implant_hu
    if dense.sum() == 0:
        return 0.0
    dense = ndimage.binary_opening(dense)  # single hot voxels are noise, not cement
    return float(dense.sum() * np.prod(volume.spacing) / 1000.0)


def noise_hu(volume: Volume, voxels: np.ndarray, checks: QualityChecks) -> float:
    """Robust noise SD in soft tissue around the body, from the in-plane 3x3 high-pass residual.

    Soft tissue is chosen on a smoothed copy, so that heavy noise does not push its own voxels
    out of the tissue window and hide itself.
    """
    box = np.asarray(volume.array[_box(volume, voxels, checks.noise_margin_mm)], np.float32)
    if min(box.shape) < 3:
        return 0.0
    smooth = ndimage.uniform_filter(box, 5)
    tissue = ndimage.binary_erosion((smooth > -150) & (smooth < 150))
    if tissue.sum() < 200:
        return 0.0
    residual = (box - ndimage.uniform_filter(box, (3, 3, 1))) * np.sqrt(9 / 8)
    r = residual[tissue]
    return float(1.4826 * np.median(np.abs(r - np.median(r))))


def level_voxels(labels: np.ndarray) -> dict[int, np.ndarray]:
    """Voxel indices of every label, found within each label's bounding box (one pass over the mask)."""
    out = {}
    for index, box in enumerate(ndimage.find_objects(labels), start=1):
        if box is not None:
            out[index] = np.argwhere(labels[box] == index) + [s.start for s in box]
    return out


def locate_level(voxels_by_id: dict[int, np.ndarray], volume: Volume, level: str) -> tuple[np.ndarray | None, np.ndarray | None]:
    """Voxel indices of `level`'s body and its RAS centre.

    A level missing from the mask gets (None, estimated centre) from its labelled neighbours, or
    (None, None) when that centre lies outside the CT's field of view.
    """
    voxels = voxels_by_id.get(LEVEL_IDS.get(level, -1))
    if voxels is not None and len(voxels):
        return voxels, volume.world(voxels.mean(axis=0))
    return None, estimate_centre(voxels_by_id, volume, level)


def estimate_centre(voxels_by_id: dict[int, np.ndarray], volume: Volume, level: str) -> np.ndarray | None:
    """RAS centre of a level absent from the mask, from its labelled neighbours; None when out of view."""
    present = {name: voxels_by_id.get(LEVEL_IDS[name]) for name in LEVEL_ORDER}
    present = {k: volume.world(v.mean(0)) for k, v in present.items() if v is not None and len(v)}
    if not present or level not in LEVEL_ORDER:
        return None
    order = np.array([LEVEL_ORDER.index(k) for k in present], float)
    centres = np.array(list(present.values()))
    target = LEVEL_ORDER.index(level)
    if len(present) >= 2:
        # The spine curves: interpolate between the nearest labelled level above and below, or
        # extrapolate from the two nearest on one side.
        if (order < target).any() and (order > target).any():
            above = int(np.argmax(np.where(order < target, order, -np.inf)))
            below = int(np.argmin(np.where(order > target, order, np.inf)))
            pick = [above, below]
        else:
            pick = list(np.argsort(np.abs(order - target))[:2])
        (o1, o2), (c1, c2) = order[pick], centres[pick]
        centre = c1 + (c2 - c1) * (target - o1) / (o2 - o1)
    else:
        centre = centres[0] + np.array([0.0, 0.0, -LEVEL_PITCH_MM * (target - order[0])])
    index = np.linalg.solve(volume.affine[:3, :3], centre - volume.affine[:3, 3])
    inside = np.all(index >= -0.5) and np.all(index <= np.array(volume.array.shape) - 0.5)
    return centre if inside else None
