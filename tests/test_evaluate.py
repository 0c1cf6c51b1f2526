"""External validation: the threshold is frozen on validation, the metrics match scikit-learn on the
written predictions, a sweep is compared model against model, and another cohort can be scored."""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from conftest import run_cli
from sklearn.metrics import confusion_matrix, roc_auc_score

from ovcf.errors import ConfigError
from ovcf.eval.external import Scoring, evaluate_predictions
from ovcf.eval.metrics import youden_threshold
from ovcf.eval.report import SECTIONS


def _records(labels, probs, subset, patients=None):
    patients = patients if patients is not None else [f"p{i}" for i in range(len(labels))]
    return [
        {"pseudonym": p, "level": "L1", "set": subset, "label": int(y), "probability": float(s), "fold": "0"}
        for p, y, s in zip(patients, labels, probs)
    ]


def test_threshold_is_frozen_on_validation():
    rng = np.random.default_rng(0)
    yv = rng.integers(0, 2, 40)
    pv = np.clip(0.3 * yv + rng.random(40) * 0.7, 0, 1)
    yt = rng.integers(0, 2, 60)
    pt = np.clip(0.3 * yt + rng.random(60) * 0.7, 0, 1)
    val = _records(yv, pv, "val")
    first = evaluate_predictions(val, _records(yt, pt, "test"))
    assert first["threshold"]["value"] == youden_threshold(yv, pv)
    # Other external labels and scores: the same threshold, other external metrics.
    flipped = evaluate_predictions(val, _records(1 - yt, 1 - pt, "test"))
    assert flipped["threshold"] == first["threshold"]
    assert flipped["test"]["confusion"] != first["test"]["confusion"]
    # The external youden threshold would differ: the frozen one is not it.
    assert youden_threshold(yt, pt) != first["threshold"]["value"]
    target = evaluate_predictions(val, _records(yt, pt, "test"), Scoring("sensitivity", 0.9))
    assert target["val"]["sensitivity"]["value"] >= 0.9


def test_one_class_validation_is_a_clear_error():
    val = _records([1, 1, 1], [0.2, 0.5, 0.9], "val")
    test = _records([0, 1], [0.1, 0.8], "test")
    with pytest.raises(ConfigError, match="one class only: threshold rule youden needs both; use threshold.rule=fixed"):
        evaluate_predictions(val, test)
    assert evaluate_predictions(val, test, Scoring("fixed"))["threshold"]["value"] == 0.5


def _test_rows(path, model):
    rows = [r for r in csv.DictReader(open(path)) if r["model"] == model and r["set"] == "test"]
    return np.array([int(r["label"]) for r in rows]), np.array([float(r["probability"]) for r in rows])


@pytest.fixture(scope="module")
def evaluated_sweep(smoke_study) -> Path:
    """`ovcf.evaluate` of the study's classifier sweep (fixed threshold, one Grad-CAM case per outcome)."""
    assert "Report:" in smoke_study.output
    return smoke_study.folder / "evaluation"


def test_evaluate_a_sweep(evaluated_sweep, tiny_sweep, smoke_study, phi_cohort, tmp_path):
    out = evaluated_sweep
    report = json.loads((out / "metrics.json").read_text())
    board = list(csv.DictReader(open(tiny_sweep / "leaderboard.csv")))
    assert report["best"] == board[0]["model"] and report["external"] == "B"
    assert set(report["models"]) == {"densenet121", "densenet121_3d"}
    for label, m in report["models"].items():
        y, p = _test_rows(out / "predictions.csv", label)
        results = json.loads((tiny_sweep / board[[r["model"] for r in board].index(label)]["run"] / "results.json").read_text())
        assert len(y) == results["n"]["test"]
        assert m["test"]["auc"]["value"] == pytest.approx(roc_auc_score(y, p), abs=1e-9)
        assert m["test"]["auc"]["value"] == pytest.approx(results["test"]["auroc"], abs=1e-4)  # same model, same rows
        tn, fp, fn, tp = confusion_matrix(y, (p >= 0.5).astype(int), labels=[0, 1]).ravel()
        assert m["test"]["confusion"] == {"tp": tp, "fn": fn, "tn": tn, "fp": fp}
        assert (out / f"confusion_{label}.png").stat().st_size > 10_000
    assert [c["model"] for c in report["comparisons"]] == [board[1]["model"]]
    assert 0 <= report["comparisons"][0]["p"] <= 1
    assert any((out / "gradcam" / "densenet121").glob("gradcam_*.png"))
    for name in ("roc.png", "calibration.png", "metrics.md", "flow.png", "report.html"):
        assert (out / name).is_file(), name
    assert "AUC (95% CI)" in (out / "metrics.md").read_text()

    # Another cohort: every included row is a test row, scored with the run's ingest and ROI.
    cohort = phi_cohort[0]
    args = [
        f"run={tiny_sweep / '0'}",
        f"cohort={cohort}",
        f"out={tmp_path / 'other'}",
        "threshold.rule=fixed",
        "gradcam_cases=0",
    ]
    env = {**smoke_study.env, "WANDB_MODE": "disabled"}
    proc = run_cli("ovcf.evaluate", [*args, "progress=false", f"hydra.run.dir={tmp_path / 'h2'}"], env, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [r for r in csv.DictReader(open(tmp_path / "other" / "predictions.csv")) if r["set"] == "test"]
    clinical = list(csv.DictReader(open(cohort / "clinical.csv")))
    assert len(rows) == len(clinical)  # the tiny cohort plants no exclusion: both centers, every row
    assert json.loads((tmp_path / "other" / "metrics.json").read_text())["external"] == str(cohort)


def test_evaluate_errors_name_the_problem(cli_env, tmp_path):
    proc = run_cli("ovcf.evaluate", [f"run={tmp_path / 'nope'}", f"hydra.run.dir={tmp_path / 'h'}"], cli_env, tmp_path)
    assert proc.returncode == 2 and "no such folder" in proc.stderr and "nope" in proc.stderr
    proc = run_cli("ovcf.evaluate", ["sample_size=true", "prevalence=0.4", f"hydra.run.dir={tmp_path / 'h'}"], cli_env, tmp_path)
    assert proc.returncode == 0 and "138 acute + 138 chronic, 345 fractures" in proc.stdout


def browser() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if shutil.which(name):
            return shutil.which(name)
    return None


def render(page, screenshot) -> str:
    """The DOM of `page` after a real headless Chromium loaded it, and a full-page screenshot."""
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-dev-shm-usage"]
    flags += ["--hide-scrollbars", "--virtual-time-budget=10000"]
    url = page.resolve().as_uri()
    subprocess.run([browser(), *flags, f"--screenshot={screenshot}", "--window-size=1200,6000", url], check=True, timeout=120)
    return subprocess.run([browser(), *flags, "--dump-dom", url], check=True, timeout=120, capture_output=True, text=True).stdout


@pytest.mark.skipif(browser() is None, reason="needs Chromium (make test and .ci/run install Debian's chromium)")
def test_report_renders_in_a_browser(evaluated_sweep):
    out = evaluated_sweep
    screenshots = Path(os.environ.get("OVCF_TEST_OUTPUTS", Path(__file__).resolve().parents[1] / "test-outputs"))
    screenshots.mkdir(parents=True, exist_ok=True)
    dom = render(out / "report.html", screenshots / "report.png")
    for section in SECTIONS:
        assert f'id="{section}"' in dom, section
    report = json.loads((out / "metrics.json").read_text())
    assert f"{report['models'][report['best']]['test']['auc']['value']:.3f}" in dom
    pngs = len(list(out.glob("*.png"))) + len(list((out / "gradcam").rglob("*.png")))
    decoded = re.search(r'data-images-decoded="(\d+)"', dom)
    assert decoded and int(decoded.group(1)) == pngs, "every figure decodes in the browser"
    assert (screenshots / "report.png").stat().st_size > 50_000


def test_notebook_rebuilds_the_evaluation(evaluated_sweep, monkeypatch):
    """notebooks/evaluation.ipynb runs on an evaluation folder; it recomputes every model's threshold,
    AUC and confusion counts from predictions.csv and asserts they equal metrics.json."""
    import nbformat
    from nbclient import NotebookClient

    root = Path(__file__).resolve().parents[1]
    monkeypatch.setenv("OVCF_EVALUATION", str(evaluated_sweep))
    nb = nbformat.read(root / "notebooks" / "evaluation.ipynb", as_version=4)
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(root)}}).execute()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    html_tables = " ".join(o.get("data", {}).get("text/html", "") for o in outputs)
    assert "densenet121_3d" in html_tables and "auc" in html_tables
    assert sum("image/png" in o.get("data", {}) for o in outputs) >= 2  # the curves and the Grad-CAM gallery


def test_another_cohort_needs_its_predicted_masks_when_the_model_was_trained_on_them(tmp_path):
    from ovcf.errors import ConfigError
    from ovcf.inference.runs import masks_for

    assert masks_for({"roi_source": "given"}, tmp_path, "ignored") is None
    assert masks_for({"roi_source": "predicted"}, tmp_path, "segmented") == "segmented"
    with pytest.raises(ConfigError, match=r"segment the cohort first .*data.cohort=.*predicted_masks="):
        masks_for({"roi_source": "predicted"}, tmp_path, None)
