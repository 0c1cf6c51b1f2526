"""The generator: contract-shaped output, determinism, and signs that change the voxels they should."""

from __future__ import annotations

import csv
import hashlib

import numpy as np
import pytest
from conftest import synthetic_params

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
