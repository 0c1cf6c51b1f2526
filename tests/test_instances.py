"""Bodies split apart and counted: from a region map (C/T/L) to one VerSe id per body."""

from __future__ import annotations

import numpy as np
import pytest

from ovcf.contract import LEVEL_IDS
from ovcf.data.instances import REGIONS, assign_levels, region_lut, region_target, split_bodies, touching
from ovcf.synth.anatomy import apply_fracture_heights, draw_fracture, draw_spine
from ovcf.synth.phantom import Grid, render

T, L = REGIONS.index("T") + 1, REGIONS.index("L") + 1


def stack(regions: list[int], height: int = 10, gap: int = 3) -> np.ndarray:
    """Boxes of `height` voxels separated by `gap`, cranial first (RAS: the last box sits at z = 0)."""
    n = len(regions)
    out = np.zeros((12, 12, n * (height + gap) + gap), np.int64)
    for i, region in enumerate(regions):
        z0 = gap + (n - 1 - i) * (height + gap)
        out[2:10, 2:10, z0 : z0 + height] = region
    return out


def levels_of(regions, spacing=(2.0, 2.0, 2.0), **kw):
    verse, assignment = assign_levels(regions, spacing, min_volume_ml=0.5, **kw)
    found = [int(v) for v in np.unique(verse) if v]
    return verse, assignment, found


def test_last_rib_anchors_the_count():
    verse, a, found = levels_of(stack([T, T, L, L, L]))
    assert a.levels == ["T11", "T12", "L1", "L2", "L3"] and a.anchored and a.agreement == 1.0
    assert found == [LEVEL_IDS[x] for x in a.levels]
    # the top box (cranial, largest z) is T11
    assert np.unique(verse[..., -8])[-1] == LEVEL_IDS["T11"]


def test_count_survives_a_body_whose_region_is_partly_wrong():
    regions = stack([T, T, L, L, L])
    z = np.nonzero((regions == T).any(axis=(0, 1)))[0]
    lower_t = z[z < np.median(z)]  # T12: a third of its voxels called lumbar
    regions[2:5, :, lower_t.min() : lower_t.max() + 1] = np.where(regions[2:5, :, lower_t.min() : lower_t.max() + 1] > 0, L, 0)
    _, a, _ = levels_of(regions)
    assert a.levels == ["T11", "T12", "L1", "L2", "L3"] and a.anchored and a.agreement < 1.0


def test_without_a_boundary_the_run_is_placed_caudally_and_flagged():
    _, a, _ = levels_of(stack([L, L, L]))
    assert a.levels == ["L3", "L4", "L5"] and not a.anchored
    _, a, _ = levels_of(stack([L] * 5))
    assert a.levels == ["L1", "L2", "L3", "L4", "L5"]


def test_small_pieces_dropped_and_tall_components_split():
    regions = stack([L, L, L])
    regions[0, 0, 0] = L  # one stray voxel
    _, a, _ = levels_of(regions)
    assert a.dropped == 1 and len(a.levels) == 3
    bridged = stack([L, L, L], height=12, gap=3)
    bridged[5:7, 5:7, :] = np.where(bridged[5:7, 5:7, :] == 0, L, bridged[5:7, 5:7, :])  # a thin bridge across the discs
    instances, _ = split_bodies(bridged > 0, (4.0, 4.0, 4.0), min_volume_ml=1.0)  # 4 mm voxels: 51 mm per 3 bodies
    assert instances.max() == 3


def test_a_body_found_in_two_fragments_is_counted_once():
    regions = stack([T, T, L, L, L])
    l1 = np.nonzero((regions == L).any(axis=(0, 1)))[0].max()  # top slice of L1, the cranial lumbar body
    body = regions[..., l1 - 9 : l1 + 1]
    body[:, 5:7, :] = 0  # a cleft through L1, front to back
    body[:, :5, :4] = 0  # the fragments share slices 4..6 but are no longer connected
    body[:, 7:, 7:] = 0
    _, a, _ = levels_of(regions)
    assert a.levels == ["T11", "T12", "L1", "L2", "L3"] and a.anchored, a
    # two neighbours collapsed to half their height, touching and tilted so that they share slices, stay two
    tilted = stack([T, T, L, L, L])
    tilted[..., l1 - 22 : l1 + 1] = 0
    b = l1 - 17  # bottom slice of the new L2; discs of 7 and 8 slices to T12 and L3
    for y in range(2, 10):
        step = (y - 2) // 3  # the endplates rise one slice every 3 voxels front to back
        tilted[2:10, y, b + step : b + step + 5] = L  # L2, 5 slices
        tilted[2:10, y, b + step + 6 : b + step + 11] = L  # L1, one empty slice above (the target's gap)
    _, a, _ = levels_of(tilted)
    assert len(a.levels) == 5, a


def test_touching_bodies_get_a_gap_in_the_target():
    verse = np.zeros((6, 6, 12), np.int32)
    verse[1:5, 1:5, 0:6], verse[1:5, 1:5, 6:12] = LEVEL_IDS["L2"], LEVEL_IDS["L1"]
    edge = touching(verse)
    assert edge[..., 5].sum() == 16 and edge[..., 6].sum() == 16 and edge.sum() == 32
    target = region_target(verse)
    assert set(np.unique(target)) == {0, L} and (target[..., 5] == 0).all()
    instances, _ = split_bodies(target > 0, (1.0, 1.0, 1.0), min_volume_ml=0.01)
    assert instances.max() == 2


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_phantom_masks_count_back_to_their_levels(seed):
    """The ground truth of rendered spines, reduced to regions, counts back to its own levels at 2 mm."""
    rng = np.random.default_rng(seed)
    vertebrae, visible = draw_spine(rng, (5, 8), -2.5)
    grades = {"acute": [1, 2, 3], "chronic": [1, 2, 3]}
    vertebrae[len(vertebrae) // 2].fracture = draw_fracture(rng, "acute", {"acute": {}, "chronic": {}}, grades)
    apply_fracture_heights(vertebrae)
    zs = [v.origin[2] for v in vertebrae]
    grid = Grid(x=np.arange(-60, 60, 2.0), y=np.arange(-50, 70, 2.0), z=np.arange(min(zs) + 10, max(zs) + 10, 2.0))
    _, labels = render(vertebrae, grid, rng)
    truth = labels.astype(np.int64)
    verse, a = assign_levels(region_target(truth), (2.0, 2.0, 2.0))
    present = [lv for lv in LEVEL_IDS if (truth == LEVEL_IDS[lv]).any()]
    assert a.levels == [lv for lv in a.levels if lv in present] and set(a.levels) == set(present), (a, present, visible)
    for level in present:
        t, p = truth == LEVEL_IDS[level], verse == LEVEL_IDS[level]
        assert 2 * (t & p).sum() / (t.sum() + p.sum()) > 0.9, level
    assert region_lut()[LEVEL_IDS["T12"]] == T and region_lut()[LEVEL_IDS["L6"]] == L


def test_a_first_sacral_segment_found_below_l5_is_counted_and_dropped():
    verse, a, found = levels_of(stack([T, L, L, L, L, L, L]))
    assert a.levels == ["T12", "L1", "L2", "L3", "L4", "L5"] and a.anchored and a.dropped == 1
    assert found == [LEVEL_IDS[x] for x in a.levels]
    assert (verse[..., 3:13] == 0).all()  # the lowest box (S1) is background
