"""Switching one cue off in the generator changes that cue alone, so an AUROC drop can be blamed on it."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import synthetic_params

from ovcf.errors import ConfigError
from ovcf.synth.anatomy import draw_fracture
from ovcf.synth.cohort import generate_cohort, synthetic_folder


def _draws(ablate=()):
    params = synthetic_params()
    rng = np.random.default_rng(3)
    labels = ["acute", "chronic"] * 200
    return [draw_fracture(rng, label, params["signs"], params["grades"], 0.5, ablate) for label in labels]


def test_an_ablated_sign_is_gone_and_every_other_draw_stays():
    full, ablated = _draws(), _draws(("impaction_band",))
    assert sum("impaction_band" in f.signs for f in full) > 50
    assert not any("impaction_band" in f.signs for f in ablated)
    for a, b in zip(full, ablated):
        assert (a.grade, a.morphology, a.loss, a.endplate) == (b.grade, b.morphology, b.loss, b.endplate)
        assert {k: v for k, v in a.signs.items() if k != "impaction_band"} == b.signs


def test_collapse_ablation_takes_the_label_out_of_the_grade():
    """Chronic fractures collapse more; with `collapse` off both labels share one grade mix."""

    def grade_gap(draws):
        acute = np.mean([f.grade for f in draws if f.label == "acute"])
        chronic = np.mean([f.grade for f in draws if f.label == "chronic"])
        return chronic - acute

    full, ablated = _draws(), _draws(("collapse",))
    assert grade_gap(full) > 0.2 and abs(grade_gap(ablated)) < 0.12
    assert [f.signs for f in full] == [f.signs for f in ablated]


def test_one_center_renders_its_patients_as_in_the_full_cohort(tiny_cohort, tmp_path):
    params = synthetic_params(patients_per_center=4, n_levels=[5, 5])
    only_b = generate_cohort(tmp_path / "b", num_workers=2, progress=False, report=False, **params | {"render_centers": ["B"]})
    full = [p for p in json.loads((tiny_cohort / "synth.json").read_text())["patients"] if p["center"] == "B"]
    assert json.loads((only_b / "synth.json").read_text())["patients"] == full
    with pytest.raises(ConfigError, match="choose from"):
        generate_cohort(tmp_path / "c", progress=False, **params | {"ablate": ["halo"]})


def test_options_that_are_off_keep_the_cohort_folder_name(tmp_path):
    params = synthetic_params()
    assert synthetic_folder(tmp_path, params | {"ablate": [], "render_centers": None}) == synthetic_folder(
        tmp_path, {k: v for k, v in params.items() if k not in ("ablate", "render_centers")}
    )
    assert synthetic_folder(tmp_path, params | {"ablate": ["vacuum_cleft"]}) != synthetic_folder(tmp_path, params)
