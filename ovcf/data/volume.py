"""Volumes in world coordinates: canonical orientation, mask matching and ROI resampling.

Everything is kept as (array indexed i, j, k; 4x4 affine from voxel index to RAS millimetres), as
nibabel does, so that CT from DICOM and masks from NIfTI meet only through their affines.
"""

from __future__ import annotations

from dataclasses import dataclass

import nibabel as nib
import numpy as np
from scipy import ndimage

from ovcf.contract import MASK_TOLERANCE_MM
from ovcf.errors import CohortError

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


@dataclass
class Volume:
    """A 3D array and its voxel-to-RAS affine."""

    array: np.ndarray
    affine: np.ndarray

    @property
    def spacing(self) -> np.ndarray:
        return np.linalg.norm(self.affine[:3, :3], axis=0)

    def canonical(self) -> Volume:
        """Same voxels, axes permuted and flipped to the closest RAS orientation."""
        ornt = nib.orientations.io_orientation(self.affine)
        if np.array_equal(ornt, [[0, 1], [1, 1], [2, 1]]):
            return self
        array = nib.orientations.apply_orientation(self.array, ornt)
        affine = self.affine @ nib.orientations.inv_ornt_aff(ornt, self.array.shape)
        return Volume(np.ascontiguousarray(array), affine)

    def world(self, index: np.ndarray) -> np.ndarray:
        """RAS millimetres of voxel indices (N x 3)."""
        return index @ self.affine[:3, :3].T + self.affine[:3, 3]


def load_nifti(path) -> Volume:
    img = nib.load(str(path))
    return Volume(np.asarray(img.dataobj), img.affine.astype(np.float64))


def mask_on_ct(mask: Volume, ct: Volume, name: str) -> np.ndarray:
    """Returns the label map on the CT's voxel grid, or raises if its voxels are not the CT's.

    Both are brought to canonical orientation first, so a mask stored in any axis order or
    direction (PIR, LPS, slices reversed ...) matches as long as its voxel centres coincide.
    """
    ct = ct.canonical()
    m = mask.canonical()
    if m.array.shape != ct.array.shape:
        raise CohortError(
            f"mask {name} has shape {m.array.shape} but its CT series has {ct.array.shape} "
            "(after reorientation): masks must be drawn on the CT's own voxels"
        )
    corners = np.array(
        [[i, j, k] for i in (0, ct.array.shape[0] - 1) for j in (0, ct.array.shape[1] - 1) for k in (0, ct.array.shape[2] - 1)],
        float,
    )
    offset = float(np.max(np.linalg.norm(ct.world(corners) - m.world(corners), axis=1)))
    if offset > MASK_TOLERANCE_MM:
        raise CohortError(
            f"mask {name} does not lie on its CT series' voxels (off by up to {offset:.3f} mm): resample it onto the CT grid"
        )
    if np.issubdtype(m.array.dtype, np.integer):
        return m.array.astype(np.int16, copy=False)
    labels = np.rint(m.array).astype(np.int16)  # float masks (VerSe stores float64) must hold whole numbers
    if not np.allclose(labels, m.array):
        raise CohortError(f"mask {name} holds non-integer labels; it must be a label map")
    return labels


def resample_roi(
    volume: Volume,
    centre: np.ndarray,
    size: int | tuple[int, int, int],
    spacing: float,
    mode: str = "bilinear",
    fill: float = -1024.0,
) -> np.ndarray:
    """Samples a cube of `size` voxels of `spacing` mm, axis-aligned in RAS, centred at `centre`.

    Trilinear for images (`mode="bilinear"`) or `nearest` for labels; outside the
    volume it reads `fill` (air for CT). Images are low-pass filtered first along every axis whose
    voxels are finer than `spacing`, so that a thin-slice scanner's noise does not alias into the
    ROI: scanners of different resolution then yield ROIs of the same resolution.
    """
    size = (size,) * 3 if isinstance(size, int) else tuple(size)
    axes = [(np.arange(n) - (n - 1) / 2) * spacing for n in size]
    grid = np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1) + centre  # RAS mm, (X, Y, Z, 3)
    index = (grid - volume.affine[:3, 3]) @ np.linalg.inv(volume.affine[:3, :3]).T
    array = np.asarray(volume.array, np.float32)
    if mode != "nearest":
        # Crop to the ROI's bounding box (plus filter margin) before filtering: far cheaper.
        sigma = np.sqrt(np.maximum(spacing**2 - volume.spacing**2, 0.0)) / 2.355 / volume.spacing
        lo = np.floor(index.reshape(-1, 3).min(0) - 3 * sigma - 1).astype(int)
        hi = np.ceil(index.reshape(-1, 3).max(0) + 3 * sigma + 2).astype(int)
        lo, hi = np.clip(lo, 0, array.shape), np.clip(hi, 0, array.shape)
        if np.any(hi - lo < 2):
            return np.full(size, fill, np.float32)
        array = array[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]]
        index = index - lo
        if np.any(sigma > 0.1):
            array = ndimage.gaussian_filter(array, sigma, mode="nearest")
    order = 0 if mode == "nearest" else 1
    coords = np.moveaxis(index, -1, 0)
    return ndimage.map_coordinates(array, coords, order=order, mode="constant", cval=fill, prefilter=False).astype(np.float32)


def resample_volume(
    volume: Volume, labels: np.ndarray | None, spacing: float
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
    """The whole CT and its label map on an isotropic RAS grid of `spacing` mm covering the scan.

    Segmentation trains on patches of one resolution whatever the scanner, and its predictions
    go back to the CT's own grid through the returned voxel-to-RAS affine.

    Returns:
        (image in HU, labels (None without), 4x4 affine), the arrays indexed along R, A, S.
    """
    shape = np.array(volume.array.shape)
    corners = np.array([[i, j, k] for i in (0, shape[0] - 1) for j in (0, shape[1] - 1) for k in (0, shape[2] - 1)], float)
    world = volume.world(corners)
    lo, hi = world.min(axis=0), world.max(axis=0)
    size = tuple(int(n) for n in np.floor((hi - lo) / spacing) + 1)
    centre = lo + (np.array(size) - 1) * spacing / 2
    image = resample_roi(volume, centre, size, spacing)
    affine = np.diag([spacing, spacing, spacing, 1.0])
    affine[:3, 3] = lo
    if labels is None:
        return image, None, affine
    label_map = resample_roi(Volume(labels, volume.affine), centre, size, spacing, "nearest", 0.0)
    return image, np.rint(label_map).astype(np.int16), affine
