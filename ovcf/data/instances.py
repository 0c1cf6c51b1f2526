"""From a region map (background, cervical, thoracic, lumbar body) to one VerSe id per vertebral body.

A segmenter sees a patch, not the whole spine, so it cannot tell L2 from L3; it can tell a body
that carries ribs (thoracic) from one that does not (lumbar), because the rib heads sit right
next to it. This module turns that local answer into levels the way a radiologist counts: split
the body mask into single bodies, order them cranio-caudally and slide the standard spine
(C1..C7, T1..T12, L1..L5) along them until the regions agree best. Where a region boundary is in
view (the last rib: T12 above L1) the count is anchored; where the pelvis lies under the lowest
body, that body is L5 (anchored too); where neither holds, the run is placed as far caudally as
fits (a lumbar scan usually ends at the sacrum) and the result says so.

Arrays are indexed like the cached volumes: RAS, so the last axis runs caudal to cranial.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage

from ovcf.contract import LEVEL_IDS

REGIONS = ("C", "T", "L")  # region class i + 1; 0 is background
STANDARD_SPINE = [*(f"C{i}" for i in range(1, 8)), *(f"T{i}" for i in range(1, 13)), *(f"L{i}" for i in range(1, 6)), "S1"]
MAX_COMPONENT_ML = 500.0  # more than a whole lumbar spine (about 5 x 40 ml) in one piece is not bodies
MAX_BODY_MM = 45.0  # a component taller than this (cranio-caudally) is taken for bodies bridged across a disc
COLUMN_MM = 25.0  # most a body's centre may lie off its neighbour's (left-right, antero-posterior)
MAX_GAP_MM = 25.0  # most space between neighbouring bodies (a disc, or a body the segmenter missed)
MAX_OVERLAP_MM = 15.0  # bodies tilted with the spine's curve overlap in height
FRAGMENT_HEIGHT = 1.5  # two pieces sharing axial slices within this many typical body heights may be one body
FRAGMENT_VOLUME = 0.9  # ... if together they hold less than a typical body
PELVIS_BAND_MM = (45.0, 140.0)  # the iliac wings' distance from the lowest body's centre, left and right
PELVIS_AREA_MM2 = 600.0  # median bone per side and slice under the lowest body that makes it the pelvis
PELVIS_DEPTH_MM = 30.0  # how far under the lowest body the pelvis is looked for (the scan must reach so far)


def region_of(level: str) -> int:
    """Region class of a level name: 1 cervical, 2 thoracic (T13 too), 3 lumbar (L6 too; S1 looks lumbar)."""
    return REGIONS.index("L" if level == "S1" else level[0]) + 1


def region_lut() -> np.ndarray:
    """VerSe id -> region class, for every id of the contract (other ids map to background)."""
    lut = np.zeros(max(LEVEL_IDS.values()) + 1, np.int64)
    for level, verse in LEVEL_IDS.items():
        lut[verse] = region_of(level)
    return lut


def touching(labels: np.ndarray) -> np.ndarray:
    """Voxels of a body that face a voxel of another body (6-neighbourhood).

    Where a collapsed body presses on its neighbour the disc vanishes at 2 mm, and a mask would join the two; a
    segmenter trained to leave these voxels empty keeps every body its own connected component.
    """
    cross = ndimage.generate_binary_structure(labels.ndim, 1)
    higher = ndimage.maximum_filter(labels, footprint=cross, mode="constant", cval=0)
    lower = ndimage.minimum_filter(np.where(labels > 0, labels, np.iinfo(np.int32).max).astype(np.int32), footprint=cross)
    return (labels > 0) & ((higher != labels) & (higher > 0) | (lower != labels) & (lower != np.iinfo(np.int32).max))


def region_target(verse: np.ndarray) -> np.ndarray:
    """Training target of a VerSe label map: region classes, with the voxels where two bodies touch left empty."""
    verse = verse.astype(np.int32)
    lut = region_lut()
    regions = lut[np.clip(verse, 0, len(lut) - 1)] * (verse < len(lut))
    regions[touching(verse)] = 0
    return regions.astype(np.int64)


@dataclass
class Assignment:
    """Levels found in one scan and how sure the count is.

    Attributes:
        levels: level name per body, cranial first.
        anchored: a region boundary (e.g. the last rib) or the pelvis fixed the count; False when the run was placed
            by the caudal rule alone.
        anchor: what fixed it: "regions" (a region boundary), "pelvis" (the lowest body sits on it: L5), or "".
        agreement: share of body voxels whose region matches the assigned level's region.
        dropped: components discarded as too small to be a body.
    """

    levels: list[str] = field(default_factory=list)
    anchored: bool = False
    anchor: str = ""
    agreement: float = float("nan")
    dropped: int = 0


def _split(component: np.ndarray, spacing: np.ndarray, min_voxels: int, depth: int = 0) -> list[np.ndarray]:
    """Cuts a component that is too tall for one body into bodies, by eroding until it falls apart.

    Discs are the narrowest part of a stack of bodies, so the first erosion that leaves two or more
    sizeable pieces has cut through them; every voxel then goes to the nearest piece.
    """
    zs = np.nonzero(component.any(axis=(0, 1)))[0]
    if (zs[-1] - zs[0] + 1) * spacing[2] <= MAX_BODY_MM or depth >= 4:
        return [component]
    step = max(1, int(round(1.0 / float(spacing.min()))))  # erode about 1 mm at a time
    eroded = component
    for _ in range(12):
        eroded = ndimage.binary_erosion(eroded, iterations=step)
        seeds, n = ndimage.label(eroded)
        if n == 0:
            break
        sizes = ndimage.sum_labels(np.ones_like(seeds), seeds, index=np.arange(1, n + 1))
        keep = np.nonzero(sizes >= max(min_voxels // 8, 1))[0] + 1
        keep = keep[np.argsort(sizes[keep - 1])[::-1][:12]]  # a stack too tall for one body holds a few, not hundreds
        if len(keep) >= 2:
            seeds = np.where(np.isin(seeds, keep), seeds, 0)
            _, nearest = ndimage.distance_transform_edt(seeds == 0, sampling=spacing, return_indices=True)
            owner = seeds[tuple(nearest)] * component
            return [piece for k in keep for piece in _split(owner == k, spacing, min_voxels, depth + 1)]
    return [component]


def split_bodies(mask: np.ndarray, spacing, min_volume_ml: float = 2.0) -> tuple[np.ndarray, int]:
    """Instance map of a binary body mask: 1..n per body, cranial first; and the number of pieces dropped.

    Args:
        mask: bool (X, Y, Z), RAS.
        spacing: mm per voxel along the three axes.
        min_volume_ml: smaller components are noise, not bodies (a cervical body is about 5 ml).
    """
    spacing = np.asarray(spacing, float)
    labels, n = ndimage.label(mask)
    min_voxels = int(np.ceil(min_volume_ml * 1000.0 / float(np.prod(spacing))))
    pieces, dropped = [], 0
    max_voxels = MAX_COMPONENT_ML * 1000.0 / float(np.prod(spacing))
    for k, box in enumerate(ndimage.find_objects(labels), start=1):
        component = labels[box] == k
        if not min_voxels <= component.sum() <= max_voxels:  # noise, or no stack of bodies (a whole pelvis, a failed net)
            dropped += 1
            continue
        for piece in _split(component, spacing, min_voxels):
            if piece.sum() >= min_voxels:
                pieces.append((box, piece))
            else:
                dropped += 1
    keep = _column(pieces, spacing)
    dropped += len(pieces) - len(keep)
    keep = _merge_fragments(keep, spacing)
    out = np.zeros(mask.shape, np.int32)
    for i, (box, piece) in enumerate(keep, start=1):
        out[box][piece] = i
    return out, dropped


def _extent(box: tuple, piece: np.ndarray, spacing: np.ndarray) -> tuple[float, float]:
    """(bottom, top) of a piece along the cranio-caudal axis, mm, voxel edges included."""
    zs = box[2].start + np.nonzero(piece.any(axis=(0, 1)))[0]
    return float(zs.min()) * spacing[2], float(zs.max() + 1) * spacing[2]


def _union(a: tuple, b: tuple) -> tuple:
    """One (box, piece) holding both pieces."""
    box = tuple(slice(min(sa.start, sb.start), max(sa.stop, sb.stop)) for sa, sb in zip(a[0], b[0]))
    piece = np.zeros([s.stop - s.start for s in box], bool)
    for part_box, part in (a, b):
        piece[tuple(slice(s.start - o.start, s.stop - o.start) for s, o in zip(part_box, box))] |= part
    return box, piece


def _merge_fragments(chain: list, spacing: np.ndarray) -> list:
    """Joins neighbours of the column that are two fragments of one body, so the count does not take them for two.

    A segmenter that misses a band through a body (a fracture cleft, bone denser than it has seen) leaves two
    pieces, each shorter and smaller than a body, that share axial slices. Neighbouring bodies are separated by
    a disc (or, collapsed and touching, by the empty gap the training target leaves); two neighbours tilted so
    that they share slices are kept apart when either is as big as a typical body or together they hold 0.9 of
    one or more (two collapsed bodies that each kept at least half their volume).
    """
    if len(chain) < 3:
        return chain
    extents = [_extent(box, piece, spacing) for box, piece in chain]
    sizes = [int(piece.sum()) for _, piece in chain]
    height = float(np.median([top - bottom for bottom, top in extents]))
    volume = float(np.median(sizes))
    out, out_extents, out_sizes = [chain[0]], [extents[0]], [sizes[0]]
    for item, (bottom, top), size in zip(chain[1:], extents[1:], sizes[1:]):
        (low, high), above = out_extents[-1], out_sizes[-1]  # the cranial neighbour, as merged so far
        fragments = (
            top > low  # share axial slices
            and max(high - low, top - bottom) <= height
            and max(high, top) - min(low, bottom) <= FRAGMENT_HEIGHT * height
            and max(above, size) < volume
            and above + size <= FRAGMENT_VOLUME * volume
        )
        if fragments:
            out[-1], out_extents[-1], out_sizes[-1] = _union(out[-1], item), (min(low, bottom), max(high, top)), above + size
        else:
            out.append(item)
            out_extents.append((bottom, top))
            out_sizes.append(size)
    return out


def _column(pieces: list, spacing: np.ndarray) -> list:
    """The pieces that stack into one spinal column, cranial first; anything off the column is dropped.

    A CT holds more bone than the spine (pelvis, ribs, sternum) and a segmenter trained on a narrow
    field of view may take some of it for a body. Bodies sit one on top of the other: each one's
    centre lies within `COLUMN_MM` (left-right, antero-posterior) of the next, with at most a disc
    between them. Of all such chains, the one with the most voxels is the spine.
    """
    if len(pieces) < 2:
        return pieces
    info = []
    for box, piece in pieces:
        idx = np.nonzero(piece)
        centre = np.array([box[a].start + idx[a].mean() for a in range(3)]) * spacing
        z = (box[2].start + idx[2]) * spacing[2]
        info.append((centre, float(z.min()), float(z.max()), int(piece.sum())))
    order = sorted(range(len(pieces)), key=lambda i: -info[i][0][2])  # cranial first
    best = [info[i][3] for i in order]  # voxels of the best chain ending at each piece
    prev = [-1] * len(order)
    for b in range(len(order)):
        cb = info[order[b]]
        for a in range(b):
            ca = info[order[a]]
            gap = ca[1] - cb[2]  # bottom of the upper piece to top of the lower one, mm
            near = np.linalg.norm(ca[0][:2] - cb[0][:2]) <= COLUMN_MM
            if near and -MAX_OVERLAP_MM <= gap <= MAX_GAP_MM and best[a] + cb[3] > best[b]:
                best[b], prev[b] = best[a] + cb[3], a
    chain, b = [], int(np.argmax(best))
    while b >= 0:
        chain.append(pieces[order[b]])
        b = prev[b]
    return chain[::-1]


def on_pelvis(lowest: np.ndarray, bone: np.ndarray, spacing) -> bool:
    """Whether the pelvis lies under the body `lowest` (bool X, Y, Z): the iliac wings' bone, both sides of it.

    `bone` is `ovcf.data.spine.bone_profile` of the scan: mm2 of bone per left-right position and slice. In the
    `PELVIS_DEPTH_MM` under the body, the median slice must hold `PELVIS_AREA_MM2` of bone on each side, within
    `PELVIS_BAND_MM` of the body's centre; the scan must reach that deep. Ribs beside the lowest thoracic and
    upper lumbar bodies hold a fifth of that; a phantom scan ends half a body under its lowest level.
    """
    spacing = np.asarray(spacing, float)
    zs = np.flatnonzero(lowest.any((0, 1)))
    depth = int(round(PELVIS_DEPTH_MM / spacing[2]))
    if not len(zs) or zs[0] < depth:
        return False
    x = (np.arange(bone.shape[0]) - np.flatnonzero(lowest.any((1, 2))).mean()) * spacing[0]
    below = bone[:, zs[0] - depth : zs[0]]
    sides = [below[(sign * x >= PELVIS_BAND_MM[0]) & (sign * x <= PELVIS_BAND_MM[1])].sum(0) for sign in (-1, 1)]
    return bool(min(np.median(side) for side in sides) >= PELVIS_AREA_MM2)


def assign_levels(
    regions: np.ndarray, spacing, min_volume_ml: float = 2.0, bone: np.ndarray | None = None
) -> tuple[np.ndarray, Assignment]:
    """VerSe label map of a region map, by counting bodies along the standard spine.

    Each candidate placement of the n bodies (cranial first) on consecutive levels of `STANDARD_SPINE`
    scores the voxels whose region matches the level's region; the best wins. Ties go to the placement
    that ends at L5, then to the most caudal one. The first sacral segment looks like a lumbar body
    and a segmenter may find it: a body counted as S1 is dropped (masks hold no S1). T13 and L6
    (transitional anatomy) are never assigned.

    When the pelvis lies under the lowest body (`on_pelvis`, given the scan's `bone`), that body is L5: the
    segmenters learn to leave S1 out, and a wide scan's region calls are weak evidence (on `example_ct` they
    named T12 lumbar, and L1..S1 outscored the true T12..L5).

    Args:
        regions: int (X, Y, Z), RAS; 0 background, else a region class (see `REGIONS`).
        spacing: mm per voxel.
        min_volume_ml: see `split_bodies`.
        bone: the scan's `ovcf.data.spine.bone_profile` (X, Z), or None (no pelvis anchor).

    Returns:
        (verse, assignment): VerSe ids (X, Y, Z) int32, and how the count was made.
    """
    instances, dropped = split_bodies(regions > 0, spacing, min_volume_ml)
    n = int(instances.max())
    verse = np.zeros(regions.shape, np.int32)
    if n == 0:
        return verse, Assignment(dropped=dropped)
    counts = np.zeros((n, len(REGIONS)), np.int64)  # voxels of each region per body
    flat_inst, flat_reg = instances.ravel(), regions.ravel()
    on = flat_inst > 0
    np.add.at(counts, (flat_inst[on] - 1, flat_reg[on] - 1), 1)
    level_region = np.array([region_of(level) - 1 for level in STANDARD_SPINE])
    n_fit = min(n, len(STANDARD_SPINE))
    last = len(STANDARD_SPINE) - n_fit  # the placement ending at S1
    scores = [(int(sum(counts[i, level_region[s + i]] for i in range(n_fit))), s == last - 1, s) for s in range(last + 1)]
    best = max(scores)  # ties: ending at L5, then the larger offset (the most caudal run)
    start = best[2]
    runner_up = max((score for score, _, s in scores if s != start), default=-1)
    anchor = (
        "regions"
        if len({region_of(level) for level in STANDARD_SPINE[start : start + n_fit]}) > 1 and best[0] > runner_up
        else ""
    )
    if bone is not None and last >= 1 and on_pelvis(instances == n_fit, bone, spacing):
        best, start, anchor = scores[last - 1], last - 1, "pelvis"
    placed = STANDARD_SPINE[start : start + n_fit]
    for i, level in enumerate(placed):
        if level in LEVEL_IDS:
            verse[instances == i + 1] = LEVEL_IDS[level]
    levels = [level for level in placed if level in LEVEL_IDS]
    assignment = Assignment(
        levels=levels,
        anchored=bool(anchor),
        anchor=anchor,
        agreement=best[0] / max(int(counts[:n_fit].sum()), 1),
        dropped=dropped + (n - n_fit) + (len(placed) - len(levels)),
    )
    return verse, assignment
