"""CT-based exclusions that must hold on reconstructions we have not seen: cement read through a soft
kernel and thick slices, metal elsewhere in the patient's spine, motion (doubled edges) and streaks;
and nothing excluded on clean phantoms of any kernel or thickness, a dense sclerotic fracture, or
real clean CT.

Phantoms are built in memory from the generator's own parts (anatomy, implants, scanner model), a
few levels each, so that every test takes seconds.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
from conftest import REAL, compose_cfg
from omegaconf import OmegaConf
from scipy import ndimage

from ovcf.contract import LEVEL_IDS
from ovcf.data.ct import IngestChecks, check_level
from ovcf.data.quality import QualityChecks, level_voxels
from ovcf.data.volume import Volume, load_nifti, mask_on_ct
from ovcf.errors import ConfigError
from ovcf.synth.anatomy import Fracture, apply_fracture_heights, draw_spine
from ovcf.synth.export import lps_affine
from ovcf.synth.implants import add_cement, add_screws
from ovcf.synth.phantom import render
from ovcf.synth.scanner import Scanner, acquire, make_grid

SHARP = Scanner()  # center A of the default cohort: 0.8 mm pixels, 1 mm slices
SOFT = Scanner(matrix=128, blur_mm=1.5)  # a soft kernel; thick slices are averaged from its 1 mm slices
DEFAULT = QualityChecks()
BONE = Scanner(matrix=128, pixel_spacing=1.0, blur_mm=0.45, sharpen=0.6, noise_hu=20.0, hu_offset=8.0)  # center B
SCLEROTIC = Fracture("chronic", 2, "wedge", 0.3, "superior", {"sclerotic_margin": {"hu": 800.0, "thickness_mm": 3.5}})


def _phantom(scanner=SHARP, slice_mm=None, n_levels=3, fracture=None, edit=None, seed=0):
    """A canonical CT `Volume`, its label map and the fully visible levels (the second one fractured).

    `edit(ideal, labels, grid, vertebrae, visible)` paints into the ideal volume before the scanner
    model (cement, screws, motion); `slice_mm` averages the 1 mm slices into thicker ones.
    """
    rng = np.random.default_rng(seed)
    vertebrae, visible = draw_spine(rng, (n_levels, n_levels), -2.9)
    if fracture is not None:
        next(v for v in vertebrae if v.level == visible[1]).fracture = fracture
        apply_fracture_heights(vertebrae)
    grid = make_grid(vertebrae, scanner, rng)
    ideal, labels = render(vertebrae, grid, rng)
    if edit is not None:
        edit(ideal, labels, grid, vertebrae, visible)
    hu = acquire(ideal, grid, scanner, rng)
    if slice_mm:
        k = int(round(slice_mm / grid.spacing[2]))
        m = hu.shape[2] // k
        hu = hu[:, :, : m * k].reshape(*hu.shape[:2], m, k).mean(axis=3)
        labels = labels[:, :, k // 2 : m * k : k]
        grid = replace(grid, z=grid.z[: m * k].reshape(m, k).mean(axis=1))
    affine = np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps_affine(grid)
    return Volume(hu, affine).canonical(), Volume(labels, affine).canonical().array, visible


def _check(volume, labels, level, **quality):
    return check_level(volume, level_voxels(labels), level, QualityChecks(**quality))


def test_cement_through_a_soft_kernel_and_2mm_slices_is_an_implant():
    """A 0.6 ml cast of fainter cement, soft kernel (1.5 mm), 2 mm slices: no voxel group stays above
    the absolute 2200 HU, but it is a compact piece far denser than this scan's own cortex."""

    def cement(ideal, labels, grid, vertebrae, visible):
        add_cement(ideal, labels, grid, [visible[1]], radius_mm=6.0, hu=2400.0)

    volume, labels, visible = _phantom(SOFT, slice_mm=2.0, edit=cement)
    check = _check(volume, labels, visible[1])
    assert check.reasons == ["implant"], check.notes
    assert check.qc["implant_ml"] < DEFAULT.implant_min_ml  # the absolute rule alone misses it
    assert check.qc["dense_ml"] >= DEFAULT.implant_dense_ml and check.qc["dense_hu"] < DEFAULT.implant_hu
    assert "cortical bone" in check.notes[0]


def test_pedicle_screws_exclude_every_row_of_the_patient_with_scope_patient():
    """Screws at the first level (and its neighbours): the fifth level is far from the metal, kept
    with scope `level`, excluded with scope `patient` with a note that names where the metal is."""

    def screws(ideal, labels, grid, vertebrae, visible):
        add_screws(ideal, grid, vertebrae, [visible[0]], np.random.default_rng(2))

    volume, labels, visible = _phantom(SOFT, slice_mm=2.0, n_levels=5, edit=screws)
    assert _check(volume, labels, visible[0]).reasons == ["implant"]
    far = _check(volume, labels, visible[4], implant_scope="level")
    assert far.reasons == [], far.notes
    patient = _check(volume, labels, visible[4], implant_scope="patient")
    assert patient.reasons == ["implant"]
    assert visible[0] in patient.qc["implant_levels"] and visible[4] not in patient.qc["implant_levels"]
    assert f"{visible[0]}" in patient.notes[0] and "implant_scope=patient" in patient.notes[0]


def _ghost(ideal, labels, grid, vertebrae, visible):
    """Motion: the patient moved 6 mm antero-posteriorly during part of the acquisition."""
    moved = ndimage.shift(ideal, (0.0, 6.0 / grid.spacing[1], 0.0), order=1, mode="nearest")
    ideal[:] = 0.6 * ideal + 0.4 * moved


def _streaks(ideal, labels, grid, vertebrae, visible):
    """Motion streaks: straight bright and dark lines (200 HU, 2 mm wide) across each 8 mm slab."""
    xx, yy = np.meshgrid(grid.x - grid.x.mean(), grid.y - grid.y.mean(), indexing="ij")
    for slab, k in enumerate(range(0, len(grid.z), 8)):
        lines = np.zeros_like(xx)
        for i, offset in enumerate((-30.0, -10.0, 15.0, 35.0)):
            angle = np.radians(25.0 + 40.0 * slab + 45.0 * i)
            distance = np.abs(-xx * np.sin(angle) + yy * np.cos(angle) - offset)
            lines += (-1) ** i * 200.0 * np.exp(-0.5 * distance**2)
        ideal[:, :, k : k + 8] += lines[:, :, None]


@pytest.mark.parametrize("motion,measure", [(_ghost, "doubling"), (_streaks, "streak_hu")])
def test_motion_doubled_or_streaked_series_with_normal_noise_is_image_quality(motion, measure):
    volume, labels, visible = _phantom(edit=motion)
    check = _check(volume, labels, visible[1])
    assert check.reasons == ["image_quality"], check.notes
    assert check.qc["noise_hu"] < DEFAULT.max_noise_hu / 2  # noise alone would keep it
    limit = {"doubling": DEFAULT.max_doubling, "streak_hu": DEFAULT.max_streak_hu}[measure]
    assert check.qc[measure] > 1.5 * limit


@pytest.mark.parametrize(
    "scanner,slice_mm,fracture",
    [
        (SHARP, None, None),
        (BONE, 2.0, None),
        (SOFT, 2.0, None),
        (SOFT, 3.0, None),
        (SOFT, 5.0, None),
        (SHARP, None, SCLEROTIC),
        (SOFT, 2.0, SCLEROTIC),
    ],
    ids=["sharp-1mm", "bone-kernel-2mm", "soft-2mm", "soft-3mm", "soft-5mm", "sclerotic-sharp", "sclerotic-soft-2mm"],
)
def test_clean_phantoms_of_any_kernel_and_a_sclerotic_fracture_are_kept(scanner, slice_mm, fracture):
    volume, labels, visible = _phantom(scanner, slice_mm, fracture=fracture, seed=1)
    for level in visible:
        check = _check(volume, labels, level)
        assert check.reasons == [], f"{level}: {check.notes}"
        assert check.qc["dense_ml"] < 0.5 * DEFAULT.implant_dense_ml
        assert check.qc["doubling"] < 0.5 * DEFAULT.max_doubling and check.qc["streak_hu"] < 0.8 * DEFAULT.max_streak_hu


def _eroded(labels):
    return np.where(ndimage.grey_erosion(labels, size=(7, 7, 7)) == labels, labels, 0)


def _dilated(labels):
    return np.where(labels > 0, labels, ndimage.grey_dilation(labels, size=(5, 5, 5)))


@pytest.mark.parametrize(
    "imprecise",
    [_eroded, _dilated, lambda labels: np.roll(labels, 4, axis=1), None],
    ids=["3-voxels-inside", "2-voxels-outside", "shifted-3mm", "level-missing"],
)
def test_an_imprecise_or_incomplete_mask_excludes_nothing(imprecise):
    """Predicted masks (ovcf.predict) fall short of the cortex, spill over it, sit off it or miss a
    level: the cortex reference, the streak region and the box round a missing level still hold."""
    volume, labels, visible = _phantom(seed=2)
    if imprecise is None:
        labels = np.where(labels == LEVEL_IDS[visible[1]], 0, labels)
    else:
        labels = imprecise(labels)
    for level in visible:
        check = _check(volume, labels, level)
        assert check.reasons == [], f"{level}: {check.notes}"
        assert check.qc["streak_hu"] < 0.8 * DEFAULT.max_streak_hu


@pytest.mark.skipif(not REAL.is_dir(), reason="../shared/data/real (real public CT) is not beside the project")
def test_real_clean_ct_is_kept_and_metal_far_from_the_spine_excludes_nothing():
    """TotalSegmentator's abdominal CT (3 mm) holds a hip prosthesis about 13 cm below L5: no level
    is excluded, with either scope; the qc measures lie well inside their limits."""
    ref = REAL / "totalsegmentator/tests/reference_files"
    ct = load_nifti(ref / "example_ct.nii.gz")
    labels = mask_on_ct(load_nifti(ref / "spine_report/test_result/totalseg_vertebrae_pp_refined.nii.gz"), ct, "seg")
    ct = ct.canonical()
    assert (ct.array > 3000).sum() > 100  # the prosthesis
    by_id = level_voxels(labels)
    for level in ("T12", "L1", "L2", "L3", "L4", "L5"):
        check = check_level(ct, by_id, level, QualityChecks())
        assert LEVEL_IDS[level] in by_id and check.reasons == [], f"{level}: {check.notes}"
        assert check.qc["implant_levels"] == [] and check.qc["dense_ml"] < 0.5 * DEFAULT.implant_dense_ml
        assert check.qc["doubling"] < 0.5 * DEFAULT.max_doubling and check.qc["streak_hu"] < DEFAULT.max_streak_hu


def test_ingest_config_states_the_defaults_and_refuses_an_unknown_scope():
    cfg = OmegaConf.to_container(compose_cfg("ingest").ingest, resolve=True)
    assert IngestChecks.from_config(cfg) == IngestChecks()
    with pytest.raises(ConfigError, match=r"implant_scope='spine': use level or patient"):
        IngestChecks.from_config({"quality": {"implant_scope": "spine"}})
