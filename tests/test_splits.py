"""Splits are by patient; the external center is only ever the test set; same seed, same split."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from conftest import compose_cfg, synthetic_params

from ovcf.data import CohortDataModule
from ovcf.data.ingest import read_index
from ovcf.data.splits import patient_folds
from ovcf.errors import ConfigError


def test_folds_never_split_a_patient():
    rng = np.random.default_rng(0)
    groups = [f"p{i}" for i in rng.integers(0, 40, 120)]
    labels = list(rng.integers(0, 2, 120))
    folds = patient_folds(labels, groups, 5, seed=3)
    for g in set(groups):
        assert len({f for f, gg in zip(folds, groups) if gg == g}) == 1
    assert sorted(set(folds)) == [0, 1, 2, 3, 4]
    assert np.array_equal(folds, patient_folds(labels, groups, 5, seed=3))
    renamed = patient_folds(labels, [f"x{g}" for g in groups], 5, seed=3)
    assert np.array_equal(renamed, folds), "another pseudonym key must give the same folds"
    assert not np.array_equal(patient_folds(labels, groups, 5, seed=4), folds)


def _datamodule(cohort, tmp_path, seed=0):
    dm = CohortDataModule(
        cohort=str(cohort),
        cache_dir=str(tmp_path / "cache"),
        key_file=str(tmp_path / "key"),
        val_fraction=0.25,
        seed=seed,
        roi_size=24,
        roi_spacing=2.0,
        hu_window=(-250, 1250),
        ingest_workers=1,
        progress=False,
    )
    dm.prepare_data()
    dm.setup("fit")
    return dm


def test_external_center_is_only_the_test_set(tiny_cohort, tmp_path):
    dm = _datamodule(tiny_cohort, tmp_path)
    assert dm.centers == {"dev": "A", "external": "B"}
    assert {r["center"] for r in dm.datasets["train"].rows} == {"A"}
    assert {r["center"] for r in dm.datasets["val"].rows} == {"A"}
    assert {r["center"] for r in dm.datasets["test"].rows} == {"B"}
    patients = {name: {r["pseudonym"] for r in ds.rows} for name, ds in dm.datasets.items()}
    assert not patients["train"] & patients["val"]
    assert not (patients["train"] | patients["val"]) & patients["test"]
    n_rows = sum(len(ds) for ds in dm.datasets.values())
    assert n_rows == sum(1 for _ in open(tiny_cohort / "clinical.csv")) - 1


def test_same_seed_same_split(tiny_cohort, tmp_path):
    a = _datamodule(tiny_cohort, tmp_path, seed=1)
    b = _datamodule(tiny_cohort, tmp_path, seed=1)
    assert [r["row"] for r in a.datasets["val"].rows] == [r["row"] for r in b.datasets["val"].rows]
    assert all(np.array_equal(a.datasets[k].images, b.datasets[k].images) for k in a.datasets)


def test_splits_json_holds_every_fold_and_is_reproducible(tiny_cohort, tmp_path):
    import json

    a = _datamodule(tiny_cohort, tmp_path, seed=2)
    first = json.loads((a.cache / "splits.json").read_text())
    dev_rows = {r["row"] for r in read_index(a.cache) if r["included"] and r["center"] == "A"}
    folds = [set(f["rows"]) for f in first["folds"]]
    assert len(folds) == 4 and set().union(*folds) == dev_rows and sum(map(len, folds)) == len(dev_rows)
    assert folds[0] == {r["row"] for r in a.datasets["val"].rows}, "fold 0 validates"
    assert set(first["test"]["rows"]) == {r["row"] for r in a.datasets["test"].rows}
    for f in first["folds"]:  # a patient lies in one fold only
        others = {p for g in first["folds"] if g is not f for p in g["patients"]}
        assert not set(f["patients"]) & others
    _datamodule(tiny_cohort, tmp_path, seed=3)
    _datamodule(tiny_cohort, tmp_path, seed=2)
    assert json.loads((a.cache / "splits.json").read_text()) == first


def test_centers_can_be_swapped_and_a_wrong_name_lists_the_centers(tiny_cohort, tmp_path):
    common = dict(cohort=str(tiny_cohort), cache_dir=str(tmp_path / "c"), key_file=str(tmp_path / "k"), roi_size=24)
    common |= {"roi_spacing": 2.0, "hu_window": (-250, 1250)}
    dm = CohortDataModule(dev_center="B", val_fraction=0.5, progress=False, **common)
    dm.setup()
    assert dm.centers == {"dev": "B", "external": "A"}
    assert {r["center"] for r in dm.datasets["test"].rows} == {"A"}
    with pytest.raises(ConfigError, match="centers found: A, B"):
        CohortDataModule(dev_center="CQMU", **common)  # fails before any ingest
    with pytest.raises(ConfigError, match="data.dev_center and data.external_center are both 'A'"):
        CohortDataModule(dev_center="A", external_center="A", **common)


def test_the_entry_point_not_the_data_module_picks_the_synthetic_cohort(tiny_cohort, tmp_path):
    """Without data.cohort the entry point points the run at the synthetic cohort of its parameters
    (generated once into paths.data_dir); the data module itself only reads a folder it is given."""
    from ovcf.cli import resolve_cohort
    from ovcf.synth.cohort import synthetic_folder

    params = synthetic_params()
    folder = synthetic_folder(tmp_path, params)
    assert folder.parent == tmp_path / "synthetic"
    assert synthetic_folder(tmp_path, synthetic_params(seed=1)) != folder, "a cohort folder is named by its parameters"
    shutil.copytree(tiny_cohort, folder)  # stands in for the generated cohort: found, so not generated again
    cfg = compose_cfg("train", [], tmp_path)
    cfg.paths.data_dir = str(tmp_path)
    cfg.data.synthetic = params
    resolve_cohort(cfg)
    assert cfg.data.cohort == str(folder.resolve()) and cfg.data.synthetic["seed"] == params["seed"]
    given = compose_cfg("train", [f"data.cohort={tiny_cohort}"], tmp_path)
    resolve_cohort(given)
    assert given.data.cohort == str(tiny_cohort) and given.data.synthetic is None, "a user's cohort records no generator"
    with pytest.raises(ConfigError, match="no cohort: set data.cohort"):
        CohortDataModule(None, 24, 2.0, (-250, 1250))
