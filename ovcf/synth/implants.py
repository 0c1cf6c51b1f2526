"""Implants the protocol excludes: vertebroplasty cement and posterior pedicle-screw fixation.

Both are painted into the ideal volume before the scanner model, so they are blurred and noisy
like the rest; screws also cast the streaks and the dark band between them that metal leaves in
filtered back-projection, which the image-quality check must not mistake for noise alone.
"""

from __future__ import annotations

import numpy as np

from ovcf.contract import LEVEL_IDS
from ovcf.synth.anatomy import Vertebra
from ovcf.synth.phantom import Grid

IMPLANT_KINDS = ("cement", "screws")
CEMENT_HU = 2800.0  # PMMA with barium
METAL_HU = 3500.0  # titanium, above what a 12-bit export stores
SCREW_RADIUS_MM = 3.0
ROD_RADIUS_MM = 2.75


def add_cement(
    ideal: np.ndarray, labels: np.ndarray, grid: Grid, levels: list[str], radius_mm: float = 8.0, hu: float = CEMENT_HU
) -> None:
    """Vertebroplasty: a cement cast inside each fractured body.

    A smaller or fainter cast (`radius_mm`, `hu`: less barium, cement mixed with trabecular bone)
    reads below an absolute cement threshold once a soft kernel and thick slices smooth it.
    """
    xx, yy, zz = np.meshgrid(grid.x, grid.y, grid.z, indexing="ij")
    for level in levels:
        body = labels == LEVEL_IDS[level]
        if not body.any():
            continue
        c = [a[body].mean() for a in (xx, yy, zz)]
        blob = body & ((xx - c[0]) ** 2 + (yy - c[1]) ** 2 + ((zz - c[2]) * 1.5) ** 2 < radius_mm**2)
        ideal[blob] = hu


def _segment(ideal: np.ndarray, grid: Grid, p0: np.ndarray, p1: np.ndarray, radius: float, value: float) -> None:
    """Paints a solid cylinder between two LPS points."""
    lo, hi = np.minimum(p0, p1) - radius - 1, np.maximum(p0, p1) + radius + 1
    sl = []
    for axis, coords in enumerate((grid.x, grid.y, grid.z)):
        a, b = np.searchsorted(coords, [lo[axis], hi[axis]])
        if b <= a:
            return
        sl.append(slice(int(a), int(b)))
    pts = np.stack(np.meshgrid(grid.x[sl[0]], grid.y[sl[1]], grid.z[sl[2]], indexing="ij"), axis=-1)
    d = p1 - p0
    t = np.clip(((pts - p0) @ d) / max(float(d @ d), 1e-9), 0, 1)
    dist = np.linalg.norm(pts - (p0 + t[..., None] * d), axis=-1)
    region = ideal[tuple(sl)]
    region[dist <= radius] = value


def _streaks(ideal: np.ndarray, metal: np.ndarray, grid: Grid, rng: np.random.Generator) -> None:
    """Beam-hardening band between metal objects and radial streaks, slice by slice."""
    xx, yy = np.meshgrid(grid.x, grid.y, indexing="ij")
    angles = rng.uniform(0, np.pi, 8)
    signs = rng.choice([-1.0, 1.0], 8)
    for k in np.nonzero(metal.any(axis=(0, 1)))[0]:
        pts = np.stack([xx[metal[:, :, k]], yy[metal[:, :, k]]], axis=1)
        centre = pts.mean(axis=0)
        dx, dy = xx - centre[0], yy - centre[1]
        r = np.hypot(dx, dy) + 1e-6
        theta = np.arctan2(dy, dx)
        streak = np.zeros_like(xx)
        for angle, sign in zip(angles, signs):
            off = np.abs(np.sin(theta - angle)) * r  # distance from the line through the centre
            streak += sign * 250.0 * np.exp(-0.5 * (off / 1.2) ** 2) * np.exp(-r / 60.0)
        left, right = pts[:, 0] < centre[0], pts[:, 0] >= centre[0]
        if left.any() and right.any():  # the dark band along the line joining two screws
            a, b = pts[left].mean(axis=0), pts[right].mean(axis=0)
            d = (b - a) / max(np.linalg.norm(b - a), 1e-6)
            along = dx * d[0] + dy * d[1]
            across = np.abs(-dx * d[1] + dy * d[0])
            span = np.linalg.norm(b - a) / 2
            streak -= 350.0 * np.exp(-0.5 * (across / 2.5) ** 2) * (np.abs(along) < span)
        ideal[:, :, k] += np.where(metal[:, :, k], 0.0, streak)


def add_screws(ideal: np.ndarray, grid: Grid, vertebrae: list[Vertebra], levels: list[str], rng: np.random.Generator) -> None:
    """Posterior fixation: pedicle screws in the fractured levels and their neighbours, two rods."""
    names = [v.level for v in vertebrae]
    instrumented = sorted({j for level in levels for j in range(names.index(level) - 1, names.index(level) + 2)})
    heads = {-1: [], 1: []}
    before = ideal >= METAL_HU
    for j in instrumented:
        if not 0 <= j < len(vertebrae):
            continue
        v = vertebrae[j]
        for side in (-1, 1):
            entry = np.array([side * 16.0, v.b + 16.0, 0.5 * v.h_mid])  # through the pedicle...
            tip = np.array([side * 7.0, -0.45 * v.b, 0.5 * v.h_mid])  # ...into the anterior body
            p0, p1 = v.origin + v.rot @ entry, v.origin + v.rot @ tip
            _segment(ideal, grid, p0, p1, SCREW_RADIUS_MM, METAL_HU)
            heads[side].append(v.origin + v.rot @ (entry + np.array([0.0, 6.0, 0.0])))
    for side_heads in heads.values():
        for a, b in zip(side_heads[:-1], side_heads[1:]):
            _segment(ideal, grid, a, b, ROD_RADIUS_MM, METAL_HU)
    _streaks(ideal, (ideal >= METAL_HU) & ~before, grid, rng)
