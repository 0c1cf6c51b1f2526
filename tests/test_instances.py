"""Bodies split apart and counted: from a region map (C/T/L) to one VerSe id per body."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
from conftest import EXAMPLE_BODIES, EXAMPLE_CT, needs_example_ct

from ovcf.contract import LEVEL_IDS
from ovcf.data.instances import REGIONS, assign_levels, region_lut, region_target, split_bodies, touching
from ovcf.data.roi import window_hu
from ovcf.data.spine import bone_profile
from ovcf.synth.anatomy import apply_fracture_heights, draw_fracture, draw_spine
from ovcf.synth.phantom import Grid, render

T, L = REGIONS.index("T") + 1, REGIONS.index("L") + 1
WINDOW = (-250.0, 1250.0)


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
    assert a.levels == ["T11", "T12", "L1", "L2", "L3"] and a.anchored and a.anchor == "regions" and a.agreement == 1.0
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


def pelvis(shape, spacing=2.0, area=1000.0, depth_mm=40.0, sides=(-1, 1), bottom=3) -> np.ndarray:
    """A bone profile (X, Z) in mm2 per position and slice: `area` per side and slice, 90 mm either side of the
    middle, in the `depth_mm` under slice `bottom` (the lowest box of `stack` starts at z = 3)."""
    x_mid = (shape[0] - 1) / 2
    bone = np.zeros((shape[0] + 120, shape[2] + 40))  # wider and deeper than the region map: the scan's bone
    z0 = 40 + bottom  # `stack`'s slices sit 40 slices up in this scan
    for side in sides:
        bone[int(60 + x_mid + side * 90 / spacing), z0 - int(depth_mm / spacing) : z0] = area
    return bone


def test_the_pelvis_under_the_lowest_body_makes_it_l5():
    """Six bodies, every slice called lumbar (as a wide real scan's region calls go): the run fits L1..S1 best and
    its lowest body is dropped as S1, unless the iliac wings under it say that it is L5."""
    regions = np.pad(stack([L] * 6), ((60, 60), (0, 0), (40, 0)))
    _, a, _ = levels_of(regions)
    assert a.levels == ["L1", "L2", "L3", "L4", "L5"] and not a.anchored and a.dropped == 1
    _, a, found = levels_of(regions, bone=pelvis(stack([L] * 6).shape))
    assert a.levels == ["T12", "L1", "L2", "L3", "L4", "L5"] and a.anchored and a.anchor == "pelvis"
    assert found == [LEVEL_IDS[x] for x in a.levels] and a.dropped == 0
    # Not the pelvis: bone on one side only, rib-sized bone (a fifth), or a scan that ends under the body.
    for bone in (
        pelvis(stack([L] * 6).shape, sides=(1,)),
        pelvis(stack([L] * 6).shape, area=130.0),
    ):
        _, a, _ = levels_of(regions, bone=bone)
        assert a.levels[-1] == "L5" and a.levels[0] == "L1" and a.anchor == "", bone.max()
    shallow = pelvis(stack([L] * 6).shape)[:, 40:]  # the scan ends 3 slices under the lowest body
    assert shallow[:, :3].max() > 0
    _, a, _ = levels_of(np.pad(stack([L] * 6), ((60, 60), (0, 0), (0, 0))), bone=shallow)
    assert a.levels[0] == "L1" and not a.anchored
    # A rib boundary in view agrees with the pelvis; the pelvis names the run even where the regions disagree.
    _, a, _ = levels_of(np.pad(stack([T, T, L, L, L, L, L]), ((60, 60), (0, 0), (40, 0))), bone=pelvis(stack([L] * 7).shape))
    assert a.levels == ["T11", "T12", "L1", "L2", "L3", "L4", "L5"] and a.anchor == "pelvis"


@needs_example_ct
def test_on_a_real_ct_the_pelvis_names_the_bodies_that_region_calls_cannot():
    """TotalSegmentator's T12-L5 bodies of example_ct (which reaches down through the pelvis), every body called
    lumbar: the pelvis under L5 names all six right; without it the count ends at S1."""
    ct = nib.as_closest_canonical(nib.load(EXAMPLE_CT))
    ref = nib.as_closest_canonical(nib.load(EXAMPLE_BODIES))
    truth = np.asarray(ref.dataobj).astype(np.int64)
    spacing = ct.header.get_zooms()
    bone = bone_profile(window_hu(ct.get_fdata().astype(np.float32), WINDOW), spacing, WINDOW)
    regions = np.where(truth > 0, L, 0)
    _, a = assign_levels(regions, spacing)
    assert a.levels == ["L1", "L2", "L3", "L4", "L5"] and not a.anchored
    verse, a = assign_levels(regions, spacing, bone=bone)
    assert a.levels == ["T12", "L1", "L2", "L3", "L4", "L5"] and a.anchor == "pelvis"
    assert (verse == truth).all()
    # Its ribs beside T12 and L1 are not a pelvis: the body above L5 alone does not anchor.
    above = np.where((truth > 0) & (truth < LEVEL_IDS["L5"]), L, 0)
    _, a = assign_levels(above, spacing, bone=bone)
    assert a.anchor != "pelvis"
