"""The difficulty report: baseline features measure what they say, and the knob moves the baseline."""

from __future__ import annotations

import json

import numpy as np
from conftest import synthetic_params

from ovcf.contract import LEVEL_IDS
from ovcf.synth.anatomy import Fracture, apply_fracture_heights, draw_fracture, draw_spine
from ovcf.synth.difficulty import baseline_auc, fracture_features
from ovcf.synth.phantom import Grid, render
from ovcf.synth.scanner import Scanner, acquire


def _fracture(rng, fracture: Fracture, step: float = 1.0):
    """Renders the middle level of a 5-level spine with `fracture`; returns its features."""
    vertebrae, _ = draw_spine(rng, (5, 5), -2.5)
    v = vertebrae[3]
    v.fracture = fracture
    apply_fracture_heights(vertebrae)
    o = v.origin
    grid = Grid(x=o[0] + np.arange(-30, 30) * step, y=o[1] + np.arange(-24, 28) * step, z=o[2] + np.arange(-34, 60) * step)
    hu, labels = render(vertebrae, grid, rng)
    hu = acquire(hu, grid, Scanner(pixel_spacing=step), rng)
    return fracture_features(hu, labels, grid.spacing, {LEVEL_IDS[v.level]: v.level})[LEVEL_IDS[v.level]]


def test_features_measure_density_height_and_condensation():
    rng = np.random.default_rng(0)
    mild = _fracture(rng, Fracture("chronic", 1, "wedge", 0.2, "superior", {}))
    severe = _fracture(rng, Fracture("chronic", 3, "crush", 0.5, "superior", {}))
    band = {"impaction_band": {"hu": 250.0, "depth_mm": 2.0, "width_mm": 6.0}, "raised_attenuation": {"hu": 40.0}}
    dense = _fracture(rng, Fracture("acute", 1, "wedge", 0.2, "superior", band))
    assert abs(mild["hu_rel"]) < 20 and mild["dense_share"] < 0.02, mild
    assert 0.7 < mild["height_ratio"] < 0.95 and severe["height_ratio"] < mild["height_ratio"] - 0.15, (mild, severe)
    assert dense["hu_rel"] > 40 and dense["dense_share"] > 0.05, dense


def test_difficulty_moves_the_baseline():
    """The same sign mix drawn at difficulty 0.1 and 0.9: the baseline AUC falls by a wide margin."""
    params = synthetic_params()
    aucs = {}
    for difficulty in (0.1, 0.9):
        rng = np.random.default_rng(1)
        rows = []
        for i in range(48):
            label = ("acute", "chronic")[i % 2]
            fracture = draw_fracture(rng, label, params["signs"], params["grades"], difficulty)
            rows.append({**_fracture(rng, fracture), "label": label, "patient_id": str(i), "center": "AB"[i % 3 == 0]})
        aucs[difficulty] = baseline_auc(rows)["cv_auc"]
    assert aucs[0.1] > 0.8 and aucs[0.9] < 0.7 and aucs[0.1] - aucs[0.9] > 0.15, aucs


def test_cohort_writes_its_report_and_montage(tiny_cohort):
    report = json.loads((tiny_cohort / "difficulty.json").read_text())
    assert report["features"] == ["hu_rel", "height_ratio", "dense_share"]
    assert report["fractures"] >= 8 and set(report["means"]) == {"acute", "chronic"}
    png = (tiny_cohort / "montage.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 20_000
    from matplotlib.image import imread

    image = imread(tiny_cohort / "montage.png")
    assert image.shape[0] > 200 and image[..., :3].std() > 0.1, "a picture, not a blank canvas"


def test_references_are_the_nearest_intact_bodies_the_scan_holds_whole():
    """A body cut by the scan's edge and a fractured one are no reference; the two nearest intact bodies are."""
    hu = np.zeros((10, 10, 50), np.float32)
    labels = np.zeros(hu.shape, np.int32)
    for verse, (z0, z1), value in [(19, (0, 8), 400.0), (20, (10, 20), 100.0), (21, (22, 32), 100.0), (22, (34, 44), 120.0)]:
        labels[2:8, 2:8, z0:z1] = verse
        hu[2:8, 2:8, z0:z1] = value
    features = fracture_features(hu, labels, (1.0, 1.0, 1.0), {20: "T12"})[20]
    assert features["hu_rel"] == -10.0  # against 21 and 22 (median 110), not the cut 19 (400)
    assert features["height_ratio"] == 1.0
