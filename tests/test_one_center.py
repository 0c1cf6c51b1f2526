"""A cohort of one center (contract, "Splits"): patient folds for internal validation, no external set.

A site checking its export, or a study without a second hospital, ingests, trains and evaluates on
patient folds of its one center; nothing is reported as external validation.
"""

from __future__ import annotations

import csv
import json
import math
import shutil
from pathlib import Path

import pytest
from conftest import compose_cfg

from ovcf.data import CohortDataModule
from ovcf.errors import CohortError, ConfigError


def center_only(src: Path, dst: Path, center: str) -> Path:
    """A copy of cohort `src` holding the clinical rows of `center` only (dicom/ and masks/ as they are:
    series of patients without a row are ignored)."""
    dst.mkdir(parents=True)
    with open(src / "clinical.csv", newline="") as fh:
        reader = csv.DictReader(fh)
        rows = [r for r in reader if r["center"] == center]
        fields = reader.fieldnames
    with open(dst / "clinical.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    for sub in ("dicom", "masks"):
        shutil.copytree(src / sub, dst / sub)
    return dst


@pytest.fixture(scope="module")
def one_center(tiny_cohort, tmp_path_factory) -> Path:
    """Center A of the tiny cohort alone (4 patients, 1 or 2 fractured vertebrae each)."""
    return center_only(tiny_cohort, tmp_path_factory.mktemp("one") / "export_a", "A")


@pytest.fixture(scope="module")
def shared_cache(tmp_path_factory) -> Path:
    """One ingest cache for the module (the cohorts are ingested once per ROI setting)."""
    return tmp_path_factory.mktemp("cache")


def _n_rows(cohort: Path) -> int:
    with open(cohort / "clinical.csv", newline="") as fh:
        return sum(1 for _ in csv.DictReader(fh))


def _datamodule(cohort: Path, cache: Path, **kwargs) -> CohortDataModule:
    settings = dict(roi_size=24, roi_spacing=2.0, hu_window=(-250, 1250), ingest_workers=1, progress=False)
    return CohortDataModule(cohort=str(cohort), cache_dir=str(cache), key_file=str(cache.parent / "key"), **settings | kwargs)


def test_one_center_gives_patient_folds_and_no_external_set(one_center, shared_cache):
    dm = _datamodule(one_center, shared_cache, val_fraction=0.5)
    dm.setup("fit")
    assert dm.centers == {"dev": "A", "external": None}
    assert set(dm.datasets) == {"train", "val"}, "no test set"
    train, val = ({r["pseudonym"] for r in dm.datasets[name].rows} for name in ("train", "val"))
    assert train and val and not train & val
    assert len(dm.datasets["train"]) + len(dm.datasets["val"]) == _n_rows(one_center)
    assert "test" not in dm.summary() and "no external center" in dm.summary()
    splits = json.loads((dm.cache / "splits.json").read_text())
    assert splits["dev_center"] == "A" and splits["external_center"] is None and splits["test"] is None
    assert sum(len(f["rows"]) for f in splits["folds"]) == _n_rows(one_center)
    with pytest.raises(ConfigError, match="no external center"):
        dm.test_dataloader()
    # Too few patients for the folds: the error of any development center, not one about centers.
    with pytest.raises(CohortError, match=r"has 4 patient\(s\); at least 5 are needed"):
        _datamodule(one_center, shared_cache, val_fraction=0.2).setup("fit")
    # Naming one center twice is still refused.
    with pytest.raises(ConfigError, match="data.dev_center and data.external_center are both 'A'"):
        _datamodule(one_center, shared_cache, dev_center="A", external_center="A")


def test_ingest_reports_one_center_without_an_external_line(one_center, tmp_path, capsys):
    from ovcf.ingest import ingest

    cfg = compose_cfg("ingest", [f"cohort={one_center}", "val_fraction=0.5", "progress=false", "workers=1"], tmp_path)
    flow = ingest(cfg)
    printed = capsys.readouterr().out
    assert list(flow["totals"]["included_by_center"]) == ["A"]
    assert "test center" not in printed and "None" not in printed
    assert "2 folds of center A; no external center" in printed
    md = next(Path(cfg.data.cache_dir).rglob("flow.md")).read_text()
    assert "| A |" in md
    assert "One center (A): patient folds for internal validation only; no external test set." in md
    assert "| Total |" not in md, "one center needs no total line"


def _train(cohort: Path, out: Path, cache: Path, *extra: str) -> dict:
    """`python -m ovcf.train` in-process at smoke settings on `cohort` (ROIs of 32 voxels, 2 patient folds)."""
    from ovcf.train import train

    overrides = [
        "debug=smoke",
        f"data.cohort={cohort}",
        f"data.cache_dir={cache}",
        f"data.key_file={cache.parent / 'key'}",
        "data.roi_size=32",
        "data.val_fraction=0.5",
        "data.progress=false",
        "data.ingest_workers=1",
        "~callbacks.progress_bar",
        *extra,
    ]
    train(compose_cfg("train", overrides, out))
    return json.loads((out / "results.json").read_text())


def _evaluate(run: Path, out: Path, *extra: str) -> dict:
    """`python -m ovcf.evaluate run=<run>` in-process (fixed threshold, no Grad-CAM, no W&B)."""
    from ovcf.evaluate import run as evaluate

    overrides = [f"run={run}", f"out={out}", "threshold.rule=fixed", "gradcam_cases=0", "wandb=disabled", "progress=false"]
    return evaluate(compose_cfg("evaluate", [*overrides, "workers=1", *extra]))


def test_train_and_evaluate_one_center(one_center, tiny_cohort, shared_cache, tmp_path, capsys):
    """Internal validation end to end: no external test, a note in the log and results.json, evaluate
    reports the validation figures, and `cohort=` still scores a third center."""
    results = _train(one_center, tmp_path / "run", shared_cache)
    log = capsys.readouterr().out
    assert results["centers"] == {"dev": "A", "external": None}
    assert results["test"] is None and "test" not in results["n"]
    assert "internal validation" in results["note"] and "not external" in results["note"]
    assert 0.0 <= results["val"]["auroc"] <= 1.0
    assert "internal validation" in log and "External test" not in log
    assert not (tmp_path / "run" / "test_predictions.csv").exists()

    report = _evaluate(tmp_path / "run", tmp_path / "eval")
    assert report["external"] is None and "no external center" in report["note"]
    model = report["models"]["densenet121"]
    assert model["test"] is None and model["val"]["n"] == results["n"]["val"]
    assert model["val"]["auc"]["value"] == pytest.approx(results["val"]["auroc"], abs=1e-4)  # same model, same rows
    md = (tmp_path / "eval" / "metrics.md").read_text()
    assert md.startswith("# Internal validation: center A (no external center)")
    assert (tmp_path / "eval" / "report.html").is_file() and (tmp_path / "eval" / "roc.png").is_file()
    rows = list(csv.DictReader(open(tmp_path / "eval" / "predictions.csv")))
    assert {r["set"] for r in rows} == {"val"}

    # A third center that arrives later is scored as before.
    third = center_only(tiny_cohort, tmp_path / "export_b", "B")
    other = _evaluate(tmp_path / "run", tmp_path / "eval_b", f"cohort={third}")
    assert other["external"] == str(third)
    assert other["models"]["densenet121"]["test"]["n"] == _n_rows(third)


def test_cross_validation_on_one_center(one_center, shared_cache, tmp_path):
    """`cv.folds=2`: the out-of-fold validation figures, mean and sd over folds; no ensemble test;
    evaluate scores every development row once, by the fold that held it out."""
    results = _train(one_center, tmp_path / "cv", shared_cache, "cv.folds=2")
    assert results["test"] is None and results["centers"]["external"] is None
    assert set(results["val_sd"]) >= {"auroc"} and len(results["folds"]) == 2
    assert all(f["test"] is None for f in results["folds"])
    assert not (tmp_path / "cv" / "test_predictions.csv").exists()
    assert "internal validation" in results["note"] and results["n"] == {"train+val": _n_rows(one_center)}
    report = _evaluate(tmp_path / "cv", tmp_path / "eval")
    assert report["external"] is None and report["models"]["densenet121"]["val"]["n"] == _n_rows(one_center)


def test_a_sweep_leaderboard_takes_runs_without_a_test():
    from ovcf.eval.leaderboard import rows

    runs = [{"run": "0", "model": "m", "val": {"auroc": 0.7}, "test": None, "note": "one center"}]
    row = rows(runs, "val/auroc")[0]
    assert row["val_auroc"] == 0.7 and row["best"] == "*" and math.isnan(row["test_auroc"])  # a blank cell


def test_segmentation_data_on_one_center(one_center, shared_cache):
    from ovcf.data.segdata import SegmentationDataModule

    common = dict(roi_size=24, roi_spacing=2.0, hu_window=(-250, 1250), ingest_workers=1, progress=False)
    dm = SegmentationDataModule(
        patch_size=(16, 16, 16),
        cohort=str(one_center),
        cache_dir=str(shared_cache),
        key_file=str(shared_cache.parent / "key"),
        volume_spacing=4.0,
        val_fraction=0.5,
        **common,
    )
    dm.setup("fit")
    assert set(dm.datasets) == {"train", "val"} and "no external center" in dm.summary()
