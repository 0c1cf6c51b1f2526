"""Protocol exclusions read from the CT itself: cement or metal, image quality, level in view.

All of them work on the CT's own voxels around the fractured body, so they need no training and
behave the same on any scanner: thresholds are in HU and millimetres (the `ingest` config group),
never in voxels, and where a reconstruction changes what a structure reads (a soft kernel or
thick slices lower a small dense object's peak) the threshold is taken relative to the scan's
own cortical bone, which the reconstruction lowers alike.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from ovcf.contract import LEVEL_IDS, LEVEL_ORDER
from ovcf.data.volume import Volume
from ovcf.errors import ConfigError

LEVEL_PITCH_MM = 28.0  # typical centre-to-centre distance of adjacent thoraco-lumbar bodies
IMPLANT_SCOPES = ("level", "patient")
CORTEX_MM = 3.0  # the band either side of a body mask's surface that holds its cortex
CORTEX_PERCENTILE = 95.0  # of the band's HU: the cortex, not the cancellous bone and soft tissue the band also holds
QC_SLICES = 4  # axial slices through the body's inner 80 % that the motion and streak measures read
DOUBLING_PIXEL_MM, DOUBLING_MM = 1.0, (3.0, 15.0)  # ghost shifts looked for; below 3 mm a ghost is blur
DOUBLING_CLIP_HU = (-200.0, 1200.0)  # metal and air edges must not outweigh the anatomy's
STREAK_PIXEL_MM, STREAK_MARGIN_MM = 1.5, 50.0
STREAK_LENGTH_MM, STREAK_SIDE_MM, STREAK_ANGLES = 40.0, 3.0, 24


@dataclass(frozen=True)
class QualityChecks:
    """Thresholds of the CT-based exclusions (the `quality` section of the `ingest` config group)."""

    implant_hu: float = 2200.0  # floor: this dense is cement or metal on any scanner
    implant_min_ml: float = 0.1  # that much above implant_hu in and around the body is an implant
    implant_above_cortex_hu: float = 800.0  # denser than the scan's own cortical bone by this much: cement or metal ...
    implant_dense_ml: float = 0.3  # ... in one connected piece this large that reaches into the body
    implant_margin_mm: float = 5.0  # "next to" the fractured body
    implant_scope: str = "patient"  # patient: cement or metal at any level of the mask excludes all the patient's rows
    max_noise_hu: float = 80.0  # soft-tissue noise (robust SD of the in-plane high-pass) above this is inadequate
    noise_margin_mm: float = 20.0  # noise and edge doubling are measured within this distance of the body
    max_slice_mm: float = 5.0  # slices further apart than this cannot show a fracture line
    max_doubling: float = 0.1  # motion: edges repeated a few mm away, as a share of the edges' own correlation
    max_streak_hu: float = 35.0  # motion or metal streaks: straight lines this much brighter or darker than the tissue by them

    def __post_init__(self):
        if self.implant_scope not in IMPLANT_SCOPES:
            raise ConfigError(f"ingest.quality.implant_scope={self.implant_scope!r}: use {' or '.join(IMPLANT_SCOPES)}")


def _box(volume: Volume, voxels: np.ndarray, margin_mm: float) -> tuple[slice, ...]:
    pad = np.ceil(margin_mm / volume.spacing).astype(int)
    lo = np.maximum(voxels.min(0) - pad, 0)
    hi = np.minimum(voxels.max(0) + pad + 1, volume.array.shape)
    return tuple(slice(a, b) for a, b in zip(lo, hi))


def _ml(volume: Volume, count: int) -> float:
    return float(count * np.prod(volume.spacing) / 1000.0)


def implant_ml(volume: Volume, voxels: np.ndarray, checks: QualityChecks) -> float:
    """Millilitres above `implant_hu` in the body (voxel indices `voxels`) and `implant_margin_mm` around it."""
    box = volume.array[_box(volume, voxels, checks.implant_margin_mm)]
    dense = box > checks.implant_hu
    if dense.sum() == 0:
        return 0.0
    dense = ndimage.binary_opening(dense)  # single hot voxels are noise, not cement
    return _ml(volume, dense.sum())


def cortex_hu(volume: Volume, voxels_by_id: dict[int, np.ndarray]) -> float | None:
    """The scan's own cortical bone (HU): the median over the mask's bodies of the `CORTEX_PERCENTILE`
    of the band `CORTEX_MM` (at least one voxel) either side of each body's surface; None without a body.

    A soft kernel, thick slices and partial volume lower the thin cortex and a cement cast alike,
    so a threshold above this holds where one absolute HU misses cement. The band holds the cortex
    whether a mask, drawn or predicted, lies a little inside or outside it; the median keeps one
    cemented or sclerotic body from moving it. Band voxels on the scan's first or last plane are a
    cut through the body, not its surface, and are left out.
    """
    reach = np.ceil(CORTEX_MM / volume.spacing - 1e-6).astype(int)  # voxels, at least one
    size = tuple(2 * reach + 1)
    last = np.array(volume.array.shape) - 1
    values = []
    for voxels in voxels_by_id.values():
        lo = voxels.min(0) - reach - 1
        body = np.zeros(voxels.max(0) - lo + reach + 2, np.uint8)
        body[tuple((voxels - lo).T)] = 1
        band = np.argwhere(ndimage.maximum_filter(body, size) > ndimage.minimum_filter(body, size)) + lo
        band = band[np.all((band > 0) & (band < last), axis=1)]
        if len(band):
            values.append(np.percentile(volume.array[tuple(band.T)], CORTEX_PERCENTILE))
    return float(np.median(values)) if values else None


def dense_ml(volume: Volume, voxels: np.ndarray, threshold_hu: float, checks: QualityChecks, in_body: bool = True) -> float:
    """Millilitres of the largest connected piece above `threshold_hu` within `implant_margin_mm` of the body.

    Cement and screws are compact and sit in the body, so only pieces that reach into it count
    (`in_body`; False when `voxels` only bound a box around a level the mask lacks): a calcified
    aorta or an osteophyte beside the body is neither.
    """
    box = _box(volume, voxels, checks.implant_margin_mm)
    pieces, count = ndimage.label(volume.array[box] > threshold_hu)
    if count == 0:
        return 0.0
    sizes = np.bincount(pieces.ravel())
    sizes[0] = 0
    if in_body:
        touching = np.unique(pieces[tuple((voxels - [s.start for s in box]).T)])
        sizes = sizes[touching]
    return _ml(volume, sizes.max())


def implant_measures(
    volume: Volume, voxels: np.ndarray, cortex: float | None, checks: QualityChecks, in_body: bool = True
) -> dict:
    """The implant measures of one level (recorded in `qc` to tune the thresholds): millilitres above
    the absolute floor (`implant_ml`), the scan's cortex (`cortex_hu`), the relative threshold
    (`dense_hu`) and the largest piece above it that reaches into the body (`dense_ml`)."""
    out = {"implant_ml": round(implant_ml(volume, voxels, checks), 3)}
    if cortex is not None:
        threshold = cortex + checks.implant_above_cortex_hu
        dense = dense_ml(volume, voxels, threshold, checks, in_body)
        out |= {"cortex_hu": round(cortex, 1), "dense_hu": round(threshold, 1), "dense_ml": round(dense, 3)}
    return out


def is_implant(measures: dict, checks: QualityChecks) -> bool:
    """Cement or metal: enough above the absolute floor, or a compact piece well above the scan's cortex."""
    return measures["implant_ml"] >= checks.implant_min_ml or measures.get("dense_ml", 0.0) >= checks.implant_dense_ml


def implant_note(measures: dict, level: str, checks: QualityChecks) -> str:
    """What `is_implant` found at `level`, in words."""
    if measures["implant_ml"] >= checks.implant_min_ml:
        return f"{measures['implant_ml']:.2f} ml above {checks.implant_hu:g} HU in or next to {level} (cement or metal)"
    return (
        f"{measures['dense_ml']:.2f} ml in one piece above {measures['dense_hu']:.0f} HU (the scan's cortical bone "
        f"{measures['cortex_hu']:.0f} HU + {checks.implant_above_cortex_hu:g}) in {level} (cement or metal)"
    )


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


def _axial(volume: Volume, voxels: np.ndarray, margin_mm: float, pixel_mm: float) -> tuple[np.ndarray, np.ndarray, float]:
    """Up to `QC_SLICES` axial slices through the inner 80 % of the body's height, cut `margin_mm`
    around it and resampled to square pixels of at least `pixel_mm`: HU (float32), the body on them,
    and the pixel size in mm. `volume` is canonical (RAS), so its third axis is the axial one."""
    box = _box(volume, voxels, margin_mm)
    z0, z1 = voxels[:, 2].min(), voxels[:, 2].max()
    ks = np.unique(np.linspace(z0 + 0.1 * (z1 - z0), z1 - 0.1 * (z1 - z0), QC_SLICES).round().astype(int))
    image = np.asarray(volume.array[box[0], box[1], ks], np.float32)
    body = np.zeros(image.shape, bool)
    on = np.isin(voxels[:, 2], ks)
    body[voxels[on, 0] - box[0].start, voxels[on, 1] - box[1].start, np.searchsorted(ks, voxels[on, 2])] = True
    pixel = float(max(pixel_mm, *volume.spacing[:2]))
    zoom = (volume.spacing[0] / pixel, volume.spacing[1] / pixel, 1.0)
    if not np.allclose(zoom, 1.0):
        image = ndimage.zoom(image, zoom, order=1)
        body = ndimage.zoom(body.astype(np.float32), zoom, order=1) > 0.5
    return image, body, pixel


def doubling(volume: Volume, voxels: np.ndarray, checks: QualityChecks) -> float:
    """Motion's doubled edges: how strongly the in-plane gradient repeats itself `DOUBLING_MM` away.

    Per direction u, the autocorrelation (on `QC_SLICES` slices through the body, within
    `noise_margin_mm` of it) of the gradient's component along u, read along u and normalised at zero shift. An edge alone
    falls off from 1 over a width the kernel sets; an edge and its ghost of weight w add a second
    peak of w(1-w)/(w^2+(1-w)^2) at the ghost's shift. The score is the largest rise above the
    lowest value (or 0) reached at a smaller shift, so a slow fall (a soft kernel) scores nothing;
    taking the component along u leaves out edges parallel to u, whose correlation along u never falls.
    """
    image, _, pixel = _axial(volume, voxels, checks.noise_margin_mm, DOUBLING_PIXEL_MM)
    if min(image.shape[:2]) < 8:
        return 0.0
    gx, gy = np.gradient(np.clip(image, *DOUBLING_CLIP_HU), axis=(0, 1))
    shape = (2 * image.shape[0], 2 * image.shape[1])  # zero padding: no wrap-around
    fx, fy = (np.fft.rfft2(g, s=shape, axes=(0, 1)) for g in (gx, gy))

    def corr(a, b):
        return np.fft.fftshift(np.fft.irfft2((np.conj(a) * b).sum(axis=2), s=shape))

    rxx, ryy, rxy = corr(fx, fx), corr(fy, fy), corr(fx, fy) + corr(fy, fx)
    centre = np.array(shape)[:, None] // 2
    shifts = np.arange(0.0, DOUBLING_MM[1] + 1e-6, 0.5)  # mm
    best = 0.0
    for angle in np.linspace(0.0, np.pi, 36, endpoint=False):
        u = np.array([np.cos(angle), np.sin(angle)])
        along = u[0] ** 2 * rxx + u[1] ** 2 * ryy + u[0] * u[1] * rxy
        profile = ndimage.map_coordinates(along, centre + u[:, None] * shifts / pixel, order=1)
        if profile[0] <= 0:
            continue
        profile = profile / profile[0]
        rise = profile - np.maximum(np.minimum.accumulate(profile), 0.0)
        best = max(best, float(rise[shifts >= DOUBLING_MM[0]].max()))
    return best


def _soft_tissue(image: np.ndarray, body: np.ndarray, pixel: float, margin: int) -> np.ndarray:
    """Soft tissue on axial slices: not air, not bone, `margin` pixels from both.

    Bone is what reads above 200 HU after a 1 mm smoothing, with gaps up to 3 mm in its outline
    closed and its inside filled, so that an osteoporotic body (cancellous bone near 100 HU inside
    a thin cortex) is bone wherever its mask, drawn or predicted, falls short of it.
    """
    r = max(1, round(3.0 / pixel))
    disk = np.hypot(*np.mgrid[-r : r + 1, -r : r + 1]) <= r
    dense = ndimage.gaussian_filter(image, (1.0 / pixel, 1.0 / pixel, 0)) > 200
    bone = np.stack([ndimage.binary_fill_holes(ndimage.binary_closing(s, disk)) for s in np.moveaxis(dense, 2, 0)], axis=2)
    air = ndimage.gaussian_filter(image, (2.0 / pixel, 2.0 / pixel, 0)) < -400
    return ndimage.binary_erosion(~(air | bone | body), np.ones((3, 3, 1), bool), iterations=margin)


def streak_hu(volume: Volume, voxels: np.ndarray, checks: QualityChecks) -> float:
    """Motion and metal streaks: HU by which straight thin lines through the soft tissue near the
    body stand out from the tissue on both sides of them.

    On each slice, tissue (not air, not bone or the body, `STREAK_SIDE_MM` from both) is averaged
    along lines `STREAK_LENGTH_MM` long in `STREAK_ANGLES` directions, and each line is compared
    with the parallel lines `STREAK_SIDE_MM` to either side: a ridge (brighter or darker than both)
    counts, an edge between two tissues does not. The slice's score is the 99th percentile of that
    contrast in its strongest direction less the median direction's, as noise and anatomy are
    much the same in every direction and a streak is not; the measure is the median over slices.
    """
    image, body, pixel = _axial(volume, voxels, STREAK_MARGIN_MM, STREAK_PIXEL_MM)
    side = max(1, round(STREAK_SIDE_MM / pixel))
    tissue = _soft_tissue(image, body, pixel, side)
    length = max(3, round(STREAK_LENGTH_MM / pixel))
    contrast = np.full((STREAK_ANGLES, image.shape[2]), np.nan)
    for i, angle in enumerate(np.linspace(0.0, 180.0, STREAK_ANGLES, endpoint=False)):
        cover = ndimage.uniform_filter1d(ndimage.rotate(tissue.astype(np.float32), angle, axes=(0, 1), order=1), length, axis=0)
        mean = ndimage.uniform_filter1d(ndimage.rotate(np.where(tissue, image, 0), angle, axes=(0, 1), order=1), length, axis=0)
        mean /= np.maximum(cover, 1e-3)
        left, right = np.roll(mean, side, axis=1), np.roll(mean, -side, axis=1)
        ridge = np.maximum(np.minimum(mean - left, mean - right), np.minimum(left - mean, right - mean))
        valid = (cover > 0.9) & (np.roll(cover, side, axis=1) > 0.9) & (np.roll(cover, -side, axis=1) > 0.9)
        valid[:, :side] = valid[:, -side:] = False
        for k in range(image.shape[2]):
            values = ridge[:, :, k][valid[:, :, k]]
            if values.size * pixel**2 >= 400:  # mm^2 of lines to rank
                contrast[i, k] = np.percentile(values, 99)
    measured = np.sum(~np.isnan(contrast), axis=0) >= STREAK_ANGLES // 2
    if not measured.any():
        return 0.0
    contrast = contrast[:, measured]
    return float(np.median(np.nanmax(contrast, axis=0) - np.nanmedian(contrast, axis=0)))


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
