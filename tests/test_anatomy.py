"""Phantom anatomy against published figures of real spines: body volumes, heights, bone density."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from ovcf.contract import LEVEL_IDS
from ovcf.synth.anatomy import draw_spine
from ovcf.synth.difficulty import _heights
from ovcf.synth.phantom import Grid, render

STEP = 0.7  # mm, isotropic


def _spines(n: int = 6, t_score: float = -2.5):
    """Renders `n` random 8-level spines on a fine isotropic grid around the bodies."""
    out = []
    for seed in range(n):
        vertebrae, _ = draw_spine(np.random.default_rng(seed), (8, 8), t_score)
        o = np.array([v.origin for v in vertebrae])
        grid = Grid(
            x=np.arange(o[:, 0].min() - 35, o[:, 0].max() + 35, STEP),
            y=np.arange(o[:, 1].min() - 28, o[:, 1].max() + 28, STEP),
            z=np.arange(o[:, 2].min() - 5, o[:, 2].max() + 40, STEP),
        )
        hu, labels = render(vertebrae, grid, np.random.default_rng(0))
        out.append((vertebrae, hu, labels))
    return out


@pytest.fixture(scope="module")
def spines():
    return _spines()


def test_body_volumes_are_real_sizes_and_grow_caudally(spines):
    """Real T12..L5 bodies hold about 31-39 ml each, larger further down."""
    volumes: dict[str, list[float]] = {}
    for vertebrae, _, labels in spines:
        for v in vertebrae:
            if v.level in LEVEL_IDS:
                volumes.setdefault(v.level, []).append((labels == LEVEL_IDS[v.level]).sum() * STEP**3 / 1000)
    lumbar = [lvl for lvl in ("T12", "L1", "L2", "L3", "L4", "L5") if lvl in volumes]
    assert len(lumbar) >= 5
    medians = [float(np.median(volumes[lvl])) for lvl in lumbar]
    assert all(28 < m < 42 for m in medians), dict(zip(lumbar, medians))
    assert medians == sorted(medians), "bodies grow caudally"


def test_l1_heights_and_density_follow_the_t_score(spines):
    """L1 is about 21-27 mm tall from anterior to posterior wall; cancellous HU tracks the T-score."""
    heights = []
    for _, _, labels in spines:
        body = labels == LEVEL_IDS["L1"]
        if body.any():
            heights.append(_heights(body, np.full(3, STEP)))
    anterior, middle, posterior = np.median(heights, axis=0)
    assert 19 < anterior < middle < 25 and 22 < posterior < 29, (anterior, middle, posterior)
    assert anterior < posterior, "a physiological wedge at the thoraco-lumbar junction"

    medians = {}
    for t in (0.0, -4.0):
        _, hu, labels = _spines(1, t)[0]
        body = labels == LEVEL_IDS["L1"] if (labels == LEVEL_IDS["L1"]).any() else labels == LEVEL_IDS["L2"]
        core = ndimage.binary_erosion(body, iterations=5)  # cancellous bone, away from the shell
        medians[t] = float(np.median(hu[core]))
    assert 140 < medians[0.0] < 185 and 30 < medians[-4.0] < 75, medians
