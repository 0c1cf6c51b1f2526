"""TotalSegmentator's outputs as a cohort's masks: whole vertebrae in, vertebral bodies with VerSe ids out.

Groups in this field already run TotalSegmentator on their CTs. Its `total` task writes whole
vertebrae: one file per structure (`vertebrae_L1.nii.gz` ...), or with `--ml` one label map of its
v2 ids (27 L5, 31 L1, 32 T12, ... 50 C1). The cohort contract wants bodies, so a patient's folder
`masks/<patient_id>/` holding either form is read here: each vertebra keeps the part in front of
the spinal canal (the posterior body wall lies between the pedicles, at the canal's anterior
edge), or, where the folder also holds the `vertebrae_body` task's output (1 = body), the part in
that mask. Against TotalSegmentator's own refined T12-L5 bodies of `example_ct` the canal cut
scores Dice 0.86-0.94 per level, the `vertebrae_body` mask 0.88-0.93 (`tests/test_totalseg.py`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from scipy import ndimage

from ovcf.contract import LEVEL_IDS
from ovcf.data.volume import Volume, load_nifti
from ovcf.errors import CohortError

# TotalSegmentator v2 (`total` task) ids of the vertebrae: C1 50 down to L5 27, so VerSe id = 51 - v2 id.
V2_FIRST, V2_LAST = 27, 50
BODY_FILE = "vertebrae_body.nii.gz"  # the `vertebrae_body` task: 1 vertebral body, 2 intervertebral disc
MIN_CANAL_MM2 = 20.0  # a hole in an axial slice of the spine smaller than this is not the canal
BODY_DEPTH_MM = 50.0  # a lumbar body is 30-40 mm deep, a whole vertebra with its spinous process 70-100 mm


def _per_level(folder: Path) -> dict[str, Path]:
    """The per-structure files of the levels (`vertebrae_L1.nii.gz` ...), by level name."""
    files = {p.name[len("vertebrae_") : -len(".nii.gz")]: p for p in folder.glob("vertebrae_*.nii.gz")}
    return {level: p for level, p in sorted(files.items()) if level in LEVEL_IDS}


def _label_maps(folder: Path) -> list[Path]:
    """The folder's label maps besides `BODY_FILE`: its per-structure levels, else every NIfTI file (one --ml map)."""
    return list(_per_level(folder).values()) or sorted(p for p in folder.glob("*.nii.gz") if p.name != BODY_FILE)


def mask_files(folder: Path) -> list[Path]:
    """The files of a TotalSegmentator folder that make the mask: what a cache's freshness depends on."""
    return _label_maps(folder) + ([folder / BODY_FILE] if (folder / BODY_FILE).is_file() else [])


def read_totalseg(folder: Path) -> Volume:
    """Vertebral bodies with VerSe ids from a folder of TotalSegmentator output, on its CT's grid.

    Raises:
        CohortError: the folder holds neither per-structure `vertebrae_<level>.nii.gz` files nor exactly one
            label map, or its files lie on different grids.
    """
    per_level = _per_level(folder)
    if per_level:
        first = load_nifti(per_level[min(per_level)])
        labels = np.zeros(first.array.shape, np.int16)
        for level, path in per_level.items():
            part = _on_grid(load_nifti(path), first, path)
            labels[part.array > 0] = LEVEL_IDS[level]
        whole = Volume(labels, first.affine)
    else:
        multi = _label_maps(folder)
        if len(multi) != 1:
            raise CohortError(
                f"mask folder {folder} holds {len(multi)} label maps and no vertebrae_<level>.nii.gz: put TotalSegmentator's "
                "per-structure output there, or its one --ml label map (v2 ids)"
            )
        raw = load_nifti(multi[0])
        v2 = np.rint(raw.array).astype(np.int16)
        vertebra = (v2 >= V2_FIRST) & (v2 <= V2_LAST)
        whole = Volume(np.where(vertebra, 51 - v2, 0).astype(np.int16), raw.affine)
    body_file = folder / BODY_FILE
    if body_file.is_file():
        body = _on_grid(load_nifti(body_file), whole, body_file).array == 1
        return Volume(np.where(body, whole.array, 0).astype(np.int16), whole.affine)
    canon = whole.canonical()
    return Volume(bodies_of(canon), canon.affine)


def _on_grid(part: Volume, ref: Volume, path: Path) -> Volume:
    if part.array.shape != ref.array.shape or not np.allclose(part.affine, ref.affine, atol=1e-3):
        raise CohortError(f"{path} does not lie on the grid of the folder's other files: all must be on the CT's voxels")
    return part


def canal_front(spine: np.ndarray, spacing) -> np.ndarray | None:
    """Per axial slice of a whole-vertebrae mask (X, Y, Z; RAS, so Y grows anteriorly), the Y index of the spinal
    canal's anterior edge: where the canal is a closed hole in the slice, its most anterior voxel; elsewhere (the
    ring open between pedicles, or no spine) interpolated along the scan. None: no canal anywhere."""
    spacing = np.asarray(spacing, float)
    slices, fronts = [], []
    for k in range(spine.shape[2]):
        ring = spine[:, :, k]
        if not ring.any():
            continue
        holes, n = ndimage.label(ndimage.binary_fill_holes(ring) & ~ring)
        if n == 0:
            continue
        sizes = ndimage.sum_labels(holes > 0, holes, range(1, n + 1)) * spacing[0] * spacing[1]
        if sizes.max() < MIN_CANAL_MM2:
            continue
        slices.append(k)
        fronts.append(np.flatnonzero((holes == 1 + int(np.argmax(sizes))).any(0)).max())
    if not slices:
        return None
    return np.interp(np.arange(spine.shape[2]), slices, fronts)


def bodies_of(whole: Volume) -> np.ndarray:
    """The bodies (VerSe ids) of a canonical (RAS) whole-vertebrae label map: the voxels in front of the canal.
    A map of bodies already (its levels no deeper than `BODY_DEPTH_MM`, median), or one without a canal anywhere,
    is kept as it is: a hole in a body (a gas cleft) is no canal."""
    levels = [v for v in np.unique(whole.array) if v > 0]
    depths = [np.ptp(np.flatnonzero((whole.array == v).any((0, 2)))) + 1 for v in levels]
    if not levels or np.median(depths) * whole.spacing[1] <= BODY_DEPTH_MM:
        return whole.array.astype(np.int16)
    front = canal_front(whole.array > 0, whole.spacing)
    if front is None:
        return whole.array.astype(np.int16)
    anterior = np.arange(whole.array.shape[1])[None, :, None] > front[None, None, :] + 0.5
    return np.where(anterior, whole.array, 0).astype(np.int16)
