"""The generator: contract-shaped output, determinism, and signs that change the voxels they should."""

from __future__ import annotations

import csv
import hashlib

import numpy as np
import pytest
from conftest import check_heights_flag_fractures, synthetic_params
from omegaconf import OmegaConf
from scipy import ndimage

from ovcf.contract import LEVEL_IDS, REQUIRED_COLUMNS
from ovcf.synth.anatomy import Fracture, draw_spine
from ovcf.synth.cohort import generate_cohort
from ovcf.synth.phantom import Grid, render


def _digest(folder) -> dict:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()
    }


def test_cohort_follows_the_contract(tiny_cohort):
    with open(tiny_cohort / "clinical.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert set(REQUIRED_COLUMNS) <= set(rows[0])
    assert {r["center"] for r in rows} == {"A", "B"}
    assert {r["label"] for r in rows} <= {"acute", "chronic"}
    for r in rows:
        assert (tiny_cohort / "masks" / f"{r['patient_id']}.nii.gz").is_file()
        assert r["level"] in LEVEL_IDS
        assert int(r["age"]) >= 50 and r["sex"] in ("F", "M")


def test_same_seed_same_bytes(tmp_path):
    params = synthetic_params(patients_per_center=1, n_levels=[5, 5])
    a = generate_cohort(tmp_path / "a", num_workers=1, progress=False, **params)
    b = generate_cohort(tmp_path / "b", num_workers=2, progress=False, **params)
    assert _digest(a) == _digest(b)
    c = generate_cohort(tmp_path / "c", num_workers=1, progress=False, **{**params, "seed": 1})
    assert _digest(a)["clinical.csv"] != _digest(c)["clinical.csv"]


def _render_l1(signs: dict, label: str = "acute", grade: int = 2):
    """Renders one spine whose L1 carries a superior-endplate wedge fracture with `signs`."""
    rng = np.random.default_rng(5)
    vertebrae, _ = draw_spine(rng, (5, 5), t_score=-2.5)
    for v in vertebrae:
        if v.level == "L1":
            break
    else:
        vertebrae, _ = draw_spine(np.random.default_rng(1), (5, 5), t_score=-2.5)
        v = next(v for v in vertebrae if v.level in ("T12", "L1", "L2"))
    v.fracture = Fracture(label, grade, "wedge", 0.3, "superior", signs)
    o = v.origin
    grid = Grid(x=o[0] + np.arange(-32, 32) * 0.8, y=o[1] + np.arange(-30, 40) * 0.8, z=o[2] + np.arange(-10, 45) * 0.8)
    hu, labels = render(vertebrae, grid, np.random.default_rng(9))
    return hu, labels == LEVEL_IDS[v.level]


def test_impaction_band_raises_hu_under_the_endplate():
    band = {"impaction_band": {"hu": 200.0, "depth_mm": 2.0, "width_mm": 5.0}}
    plain, body = _render_l1({})
    banded, body2 = _render_l1(band)
    assert np.array_equal(body, body2), "the band changes density, not shape"
    rise = banded[body] - plain[body]
    assert rise.max() > 150 and np.percentile(rise, 30) < 5, "a band, not a constant offset"


def test_vacuum_cleft_is_gas_and_sclerosis_is_dense():
    plain, body = _render_l1({}, "chronic")
    cleft, _ = _render_l1({"vacuum_cleft": {"length_mm": 20.0, "height_mm": 3.0}}, "chronic")
    assert (cleft[body] < -500).sum() > 20 and (plain[body] < -500).sum() == 0
    sclerotic, _ = _render_l1({"sclerotic_margin": {"hu": 300.0, "thickness_mm": 3.0}}, "chronic")
    rise = sclerotic[body] - plain[body]
    assert (rise > 150).mean() > 0.04 and np.median(rise) < 5, "dense along the collapsed endplate only"


def test_fracture_lines_cut_the_bone():
    plain, body = _render_l1({})
    lines, _ = _render_l1({"fracture_lines": {"count": 2.0, "step_mm": 1.0, "width_mm": 1.5}})
    assert ((plain - lines)[body] > 80).sum() > 30, "lucent lines lower the HU of bone voxels"


@pytest.mark.parametrize("grade,low,high", [(1, 0.15, 0.3), (3, 0.35, 0.65)])
def test_grade_sets_the_height_loss(grade, low, high):
    loss = {1: 0.22, 3: 0.5}[grade]
    rng = np.random.default_rng(2)
    vertebrae, _ = draw_spine(rng, (5, 5), -2.5)
    v = vertebrae[2]
    intact_grid = Grid(
        x=v.origin[0] + np.arange(-3, 4) * 0.5,
        y=v.origin[1] - v.b + np.arange(2, 6) * 0.5,
        z=v.origin[2] + np.arange(-20, 80) * 0.5,
    )
    _, before = render(vertebrae, intact_grid, np.random.default_rng(0))
    v.fracture = Fracture("chronic", grade, "wedge", loss, "superior", {})
    _, after = render(vertebrae, intact_grid, np.random.default_rng(0))
    lid = LEVEL_IDS[v.level]
    h0 = (before[3, 1] == lid).sum()
    h1 = (after[3, 1] == lid).sum()
    assert low < 1 - h1 / h0 < high


def test_synth_command_writes_a_cohort(cli_env, tmp_path):
    from conftest import run_cli

    out = tmp_path / "cohort"
    args = [f"out={out}", "patients_per_center=1", "n_levels=[5,5]", "plant=null", "seed=3", f"hydra.run.dir={tmp_path / 'run'}"]
    proc = run_cli("ovcf.synth", args, cli_env, tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert str(out) in proc.stdout
    with open(out / "clinical.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert {r["center"] for r in rows} == {"A", "B"}
    assert len(list((out / "masks").glob("*.nii.gz"))) == 2
    assert len(list((out / "dicom").rglob("*.dcm"))) > 100


def test_raised_attenuation_lifts_the_whole_body():
    plain, body = _render_l1({})
    raised, _ = _render_l1({"raised_attenuation": {"hu": 30.0}})

    rise = (raised - plain)[ndimage.binary_erosion(body, iterations=3)]  # cancellous bone, inside the shell
    assert 25 < np.percentile(rise, 5) and np.percentile(rise, 95) < 31, "the whole cancellous body, evenly"


def test_swelling_and_osteophytes_change_the_tissue_outside_the_body():
    plain, body = _render_l1({}, "chronic")
    swollen, _ = _render_l1({"soft_tissue_swelling": {"thickness_mm": 6.0, "hu": 45.0}})
    spurs, _ = _render_l1({"osteophytes": {"size_mm": 4.0}}, "chronic")
    outside = ~body
    fat = outside & (plain < -50)
    assert ((swollen - plain)[fat] > 60).sum() > 100, "fat next to the body becomes soft tissue"
    assert ((spurs - plain)[outside] > 200).sum() > 10, "bony spurs grow outside the body mask"
    assert np.array_equal(body, _render_l1({"osteophytes": {"size_mm": 4.0}}, "chronic")[1])


def test_difficulty_scales_probability_and_contrast():
    from ovcf.synth.anatomy import draw_fracture

    signs = {"acute": {"impaction_band": {"p": 0.4, "hu": [100, 100], "depth_mm": [2, 2], "width_mm": [4, 4]}}}
    grades = {"acute": [1, 1, 1]}

    def draws(difficulty):
        rng = np.random.default_rng(0)
        return [draw_fracture(rng, "acute", signs, grades, difficulty).signs for _ in range(400)]

    assert not any(draws(1.0)), "difficulty 1: no sign at all"
    default, easy = draws(0.5), draws(0.0)
    assert 0.33 < np.mean([bool(s) for s in default]) < 0.47
    assert 0.72 < np.mean([bool(s) for s in easy]) < 0.88, "difficulty 0 doubles the probability"
    assert {s["impaction_band"]["hu"] for s in default if s} == {100.0}
    assert {s["impaction_band"]["hu"] for s in easy if s} == {200.0}, "and the contrast"
    assert {s["impaction_band"]["depth_mm"] for s in easy if s} == {2.0}, "but not the geometry"


def test_unknown_difficulty_is_a_config_error(tmp_path):
    from ovcf.errors import ConfigError

    with pytest.raises(ConfigError, match="synthetic.difficulty"):
        generate_cohort(tmp_path, progress=False, **synthetic_params(patients_per_center=1, difficulty=1.5))


def test_screws_are_metal_with_streaks_and_caught_as_implant(tmp_path):
    """Planted implants alternate between cement and pedicle screws; ingest excludes both."""
    import json

    from ovcf.data.ingest import ingest, read_index
    from ovcf.data.roi import RoiSpec

    plant = {"implant": 2}
    params = synthetic_params(patients_per_center=2, n_levels=[5, 5], plant=plant, export={"mr_series": False})
    cohort = generate_cohort(tmp_path / "c", num_workers=2, progress=False, report=False, **params)
    truth = json.loads((cohort / "synth.json").read_text())["patients"]
    assert sorted(p["implant"] for p in truth) == ["cement", "cement", "screws", "screws"]
    cache = ingest(cohort, tmp_path / "cache", RoiSpec(24, 2.0), tmp_path / "key", num_workers=2, progress=False)
    assert all(r["reasons"] == ["implant"] for r in read_index(cache))


def test_screws_cast_streaks_beyond_the_metal():
    from ovcf.synth.implants import METAL_HU, add_screws
    from ovcf.synth.scanner import Scanner, make_grid

    rng = np.random.default_rng(3)
    vertebrae, visible = draw_spine(rng, (5, 5), -2.5)
    grid = make_grid(vertebrae, Scanner(matrix=96), rng)
    ideal, _ = render(vertebrae, grid, rng)
    fixed = ideal.copy()
    add_screws(fixed, grid, vertebrae, [visible[2]], np.random.default_rng(0))
    metal = fixed >= METAL_HU
    assert metal.sum() * np.prod(grid.spacing) / 1000 > 2, "six screws and two rods: several ml of metal"
    change = (fixed - ideal)[~metal]
    assert (change < -200).sum() > 500 and (change > 100).sum() > 500, "dark band and bright streaks off the metal"
    assert not (fixed - ideal)[:, :, ~metal.any(axis=(0, 1))].any(), "streaks only in slices through metal"


def test_masks_land_on_the_bodies_in_world_coordinates_read_by_simpleitk(tiny_cohort):
    """Read independently of ovcf (SimpleITK, world-space resampling), every mask sits on bone."""
    assert _masks_on_bone(tiny_cohort) == 8


def _masks_on_bone(cohort) -> int:
    """Checks every patient's mask against its CT read by SimpleITK; returns how many it checked."""
    import json

    import SimpleITK as sitk

    truth = {p["patient_id"]: p for p in json.loads((cohort / "synth.json").read_text())["patients"]}
    seen = 0
    for folder in sorted((cohort / "dicom").glob("*/*/2_spine")):
        reader = sitk.ImageSeriesReader()
        reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(folder)))
        reader.LoadPrivateTagsOn()
        reader.MetaDataDictionaryArrayUpdateOn()
        ct = reader.Execute()
        patient = reader.GetMetaData(0, "0010|0020").strip()
        mask = sitk.ReadImage(str(cohort / "masks" / f"{patient}.nii.gz"))
        on_ct = sitk.Resample(mask, ct, sitk.Transform(), sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
        hu = sitk.GetArrayFromImage(ct).astype(np.float32)  # z, y, x
        labels = sitk.GetArrayFromImage(on_ct)
        assert (labels > 0).sum() == (sitk.GetArrayFromImage(mask) > 0).sum(), "the mask lies on the CT's voxels"
        shift = int(round(40 / ct.GetSpacing()[1]))  # 40 mm anterior of a body: soft tissue
        anterior_axis = 1 if ct.GetDirection()[4] > 0 else None  # rows run anterior -> posterior (LPS y)
        assert anterior_axis == 1
        for level in truth[patient]["visible_levels"]:
            body = labels == LEVEL_IDS[level]
            assert body.sum() * np.prod(ct.GetSpacing()) / 1000 > 10, level
            in_front = np.roll(body, -shift, axis=1)
            # + 40: an osteoporotic body with a thin cortex (round style) lies ~55 HU above muscle
            assert np.median(hu[body]) > np.median(hu[in_front]) + 40, f"{patient} {level}: mask off the bone"
        heights = []
        for level in truth[patient]["visible_levels"]:  # cranial first
            centre = np.argwhere(labels == LEVEL_IDS[level]).mean(axis=0)[::-1]  # x, y, z index
            heights.append(ct.TransformContinuousIndexToPhysicalPoint([float(c) for c in centre])[2])
        assert heights == sorted(heights, reverse=True), "levels run head to feet in world coordinates"
        seen += 1
    return seen


STYLES = ["classic", "round", "box", "plate"]


@pytest.mark.parametrize("index,style", enumerate(STYLES))
def test_each_style_renders_a_valid_cohort(tmp_path, index, style):
    """One patient per style (on alternating centers): masks on the bone, signs column as in synth.json, heights
    that flag the fractured levels."""
    import json

    params = synthetic_params(patients_per_center=1, n_levels=[5, 5], plant={}, difficulty=0.1, style_mix=[style])
    params |= {"render_centers": ["AB"[index % 2]], "export": {"localizer": False, "mr_series": False, "thick_ct_fraction": 0}}
    cohort = generate_cohort(tmp_path / style, num_workers=1, progress=False, report=False, **params)
    assert _masks_on_bone(cohort) == 1
    (patient,) = json.loads((cohort / "synth.json").read_text())["patients"]
    assert patient["style"]["name"] == style
    with open(cohort / "clinical.csv", newline="") as fh:
        rows = {r["level"]: r["signs"] for r in csv.DictReader(fh)}
    assert rows == {f["level"]: ";".join(sorted(f["signs"])) for f in patient["fractures"]}
    assert any(rows.values()), "difficulty 0.1: the fractures show signs"
    for f in patient["fractures"]:
        assert all("variant" in sign or name == "osteophytes" for name, sign in f["signs"].items())
    # Every style's normal bodies read as normal: Genant's heights flag the fractured levels
    check_heights_flag_fractures(cohort / "masks" / f"{patient['patient_id']}.nii.gz", {f["level"] for f in patient["fractures"]})


def _looks(*names):
    from ovcf.synth.style import check_styles, draw_look

    styles, _ = check_styles(synthetic_params())
    return [draw_look(np.random.default_rng(0), styles, [name]) for name in names]


def test_styles_change_the_body_shape_and_the_kernel_of_the_same_patient():
    """The same spine drawn once: box bodies fill their bounding box, sharp kernels overshoot, blotchy noise is smooth."""
    from ovcf.synth.scanner import Scanner, acquire

    classic, box, rnd = _looks("classic", "box", "round")
    fill = {}
    for look in (classic, box):
        rng = np.random.default_rng(4)
        vertebrae, _ = draw_spine(rng, (5, 5), -2.5)
        v = vertebrae[2]
        o = v.origin
        grid = Grid(x=o[0] + np.arange(-40, 40) * 0.8, y=o[1] + np.arange(-30, 30) * 0.8, z=o[2] + np.arange(10, 14) * 1.0)
        hu, labels = render(vertebrae, grid, np.random.default_rng(9), look=look)
        section = labels[:, :, 2] == LEVEL_IDS[v.level]
        xs, ys = np.nonzero(section)
        fill[look.name] = section.sum() / ((np.ptp(xs) + 1) * (np.ptp(ys) + 1))
        if look is box:
            box_hu, box_grid = hu, grid
    assert fill["classic"] < 0.82 < 0.88 < fill["box"], fill

    center = Scanner(noise_hu=0.0)
    soft = acquire(box_hu, box_grid, classic.scanner_for(center), np.random.default_rng(0))
    sharp = acquire(box_hu, box_grid, box.scanner_for(center), np.random.default_rng(0))
    assert sharp.max() > box_hu.max() + 40 > soft.max() + 40, "a sharp kernel overshoots at the cortex"

    flat = np.zeros((64, 64, 8), np.float32)
    flat_grid = Grid(x=np.arange(64) * 0.8, y=np.arange(64) * 0.8, z=np.arange(8) * 1.0)

    def high_pass_share(look):
        noise = acquire(flat, flat_grid, look.scanner_for(Scanner(noise_hu=20.0)), np.random.default_rng(1))
        residual = noise - ndimage.uniform_filter(noise, (3, 3, 1))
        return residual.std() / noise.std()

    assert high_pass_share(box) > high_pass_share(classic) > high_pass_share(rnd) + 0.1, "fine grain vs blotchy noise"


def test_style_mix_restricts_the_styles_and_an_unknown_one_is_a_config_error(tmp_path):
    from conftest import compose_cfg

    from ovcf.errors import ConfigError
    from ovcf.synth.style import check_styles, draw_look

    params = synthetic_params(style_mix=["round", "box"])
    styles, mix = check_styles(params)
    drawn = {draw_look(np.random.default_rng([0, i]), styles, mix).name for i in range(40)}
    assert drawn == {"round", "box"}
    cfg = compose_cfg("train", ["synthetic.style_mix=[round,cartoon]"])
    with pytest.raises(ConfigError, match=r"synthetic.style_mix names cartoon: the known styles are classic, round, box, plate"):
        generate_cohort(tmp_path, progress=False, **OmegaConf.to_container(cfg.synthetic, resolve=True))
