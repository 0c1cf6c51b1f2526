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
    noise_margin_mm: float = 30.0  # noise is measured in soft tissue within this distance of the body
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
    smooth = ndimage.gaussian_filter(box, 2.0)
    tissue = ndimage.binary_erosion((smooth > -150) & (smooth < 150), iterations=2)
    if tissue.sum() < 200:
        return 0.0
    residual = (box - ndimage.uniform_filter(box, (3, 3, 1))) * np.sqrt(9 / 8)
    r = residual[tissue]
    return float(1.4826 * np.median(np.abs(r - np.median(r))))


def locate_level(labels: np.ndarray, volume: Volume, level: str) -> tuple[np.ndarray | None, str]:
    """Voxels of `level` in the mask, or where it should be when the mask lacks it.

    Returns (voxel indices of the body, "mask"), or (None, "estimated") with the estimate kept in
    `estimate_centre`, or (None, "outside") when the level lies outside the CT's field of view.
    """
    level_id = LEVEL_IDS.get(level)
    voxels = np.argwhere(labels == level_id) if level_id is not None else np.empty((0, 3), int)
    if len(voxels):
        return voxels, "mask"
    return None, "outside" if estimate_centre(labels, volume, level) is None else "estimated"


def estimate_centre(labels: np.ndarray, volume: Volume, level: str) -> np.ndarray | None:
    """RAS centre of a level absent from the mask, from its labelled neighbours; None when out of view."""
    present = {name: np.argwhere(labels == LEVEL_IDS[name]) for name in LEVEL_ORDER if name in LEVEL_IDS}
    present = {k: volume.world(v.mean(0)) for k, v in present.items() if len(v)}
    if not present or level not in LEVEL_ORDER:
        return None
    order = np.array([LEVEL_ORDER.index(k) for k in present], float)
    centres = np.array(list(present.values()))
    target = LEVEL_ORDER.index(level)
    if len(present) >= 2:
        fit = np.polyfit(order, centres, 1)  # straight line through the labelled centres
        centre = fit[0] * target + fit[1]
    else:
        centre = centres[0] + np.array([0.0, 0.0, -LEVEL_PITCH_MM * (target - order[0])])
    index = np.linalg.solve(volume.affine[:3, :3], centre - volume.affine[:3, 3])
    inside = np.all(index >= -0.5) and np.all(index <= np.array(volume.array.shape) - 0.5)
    return centre if inside else None
