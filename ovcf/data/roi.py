"""ROI geometry and HU windowing: the cube cut around each vertebral body and how its HU reach a network.

Ingest, predict, evaluate and the sign ablation all cut ROIs with `cut_roi` from a `RoiSpec` built
by `RoiSpec.from_settings` out of a run's data settings, and every dataset windows HU with
`window_hu`: a model then sees at inference exactly what it saw in training. The default sizes,
spacings and HU window are written once, in the data config (`conf/data/default.yaml`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ovcf.data.volume import Volume, resample_roi

CHECK_BOX_MM = 30.0  # side of the box the implant and noise checks read around a level missing from the mask


@dataclass(frozen=True)
class RoiSpec:
    """What is cached per patient: the cube cropped around each fractured body (`size` voxels of
    `spacing` mm per side) and, for segmentation, the whole CT and its label map resampled to
    `volume_spacing` mm, axis-aligned in RAS (None: not cached).

    With `margin` (mm), each cube instead spans its body's largest extent plus `margin` on either
    side, so its spacing follows the body (a small body is seen finer); a level missing from the
    mask keeps `spacing`."""

    size: int
    spacing: float
    volume_spacing: float | None = None
    margin: float | None = None

    @classmethod
    def from_settings(cls, data: dict, volume_spacing: float | None = None) -> RoiSpec:
        """The ROI of a data module's settings (`roi_size`, `roi_spacing`, `roi_margin`): what a run
        was trained on, so evaluate, predict and the sign ablation cut the same cubes."""
        margin = data.get("roi_margin")
        return cls(
            int(data["roi_size"]),
            float(data["roi_spacing"]),
            None if volume_spacing is None else float(volume_spacing),
            None if margin is None else float(margin),
        )

    def spacing_for(self, voxels: np.ndarray | None, volume: Volume) -> float:
        """The cube's spacing (mm) for a body given by its voxel indices."""
        if self.margin is None or voxels is None or not len(voxels):
            return self.spacing
        # The body's bounding box in RAS mm (voxel edges included), its longest side.
        extent = float((np.abs(volume.affine[:3, :3]) @ (voxels.max(0) - voxels.min(0) + 1.0)).max())
        return (extent + 2 * float(self.margin)) / self.size


def check_box(voxels: np.ndarray | None, centre: np.ndarray, volume: Volume) -> np.ndarray:
    """Where the implant and noise checks look: the body's voxels, or for a level missing from the
    mask a box of voxel indices around its estimated centre."""
    if voxels is not None:
        return voxels
    index = np.linalg.solve(volume.affine[:3, :3], centre - volume.affine[:3, 3])
    half = CHECK_BOX_MM / 2 / volume.spacing
    box = np.array([index - half, index + half]).round().astype(int)
    return np.clip(box, 0, np.array(volume.array.shape) - 1)


def cut_roi(volume: Volume, voxels: np.ndarray | None, centre: np.ndarray, roi: RoiSpec) -> tuple[np.ndarray, np.ndarray, float]:
    """The ROI cube around one body, as the cache stores it: HU (int16 range), the body mask (uint8)
    and the spacing used."""
    spacing = roi.spacing_for(voxels, volume)
    image = resample_roi(volume, centre, roi.size, spacing)
    body = resample_roi(_body_volume(voxels, volume), centre, roi.size, spacing, "nearest", 0.0)
    return np.clip(np.rint(image), -32768, 32767).astype(np.int16), (body > 0.5).astype(np.uint8), spacing


def _body_volume(voxels: np.ndarray | None, volume: Volume) -> Volume:
    """The body's mask on its bounding box of CT voxels (all zero when the mask lacks the level)."""
    if voxels is None:
        return Volume(np.zeros((1, 1, 1), np.float32), volume.affine)
    # One voxel of margin (within the CT) so that sampling rounds at the box edge as on the full grid.
    lo = np.maximum(voxels.min(axis=0) - 1, 0)
    hi = np.minimum(voxels.max(axis=0) + 1, np.array(volume.array.shape) - 1)
    box = np.zeros(hi - lo + 1, np.float32)
    box[tuple((voxels - lo).T)] = 1.0
    affine = volume.affine.copy()
    affine[:3, 3] = volume.world(lo[None].astype(float))[0]
    return Volume(box, affine)


def window_hu(image: np.ndarray, hu_window) -> np.ndarray:
    """HU mapped to [0, 1] over `hu_window` (clipped), float32: what every network here is fed."""
    lo, hi = (float(v) for v in hu_window)
    return ((np.clip(image, lo, hi) - lo) / (hi - lo)).astype(np.float32)
