"""Optuna searches (`hparams_search=...`): the configs compose, augmentation strength scales the
transforms, and a search stores its trials in SQLite and continues there when run again."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest
from conftest import compose_cfg, run_cli
from omegaconf import OmegaConf

from ovcf.cli import check_overrides, config_dir
from ovcf.data.augment import scale_augment

SEARCH = "hparams_search"


@pytest.mark.parametrize(
    ("name", "metric", "task"),
    [("classification_optuna", "val/auroc", "classification"), ("segmentation_optuna", "val/dice", "segmentation")],
)
def test_search_configs_compose(name, metric, task):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = compose("train", overrides=[f"{SEARCH}={name}"], return_hydra_config=True)
    assert cfg.optimized_metric == metric and cfg.task == task
    sweeper = cfg.hydra.sweeper
    assert "OptunaSweeper" in sweeper._target_ and sweeper.direction == "maximize"
    assert sweeper.storage == f"sqlite:///logs/optuna/{sweeper.study_name}.db"  # fixed name: a re-run continues it
    assert {"model.lr", "model.weight_decay"} <= set(sweeper.params)
    assert all(OmegaConf.select(cfg, key, default="absent") != "absent" for key in sweeper.params)  # existing keys
    if task == "classification":
        assert {"data.augment_strength", "data.roi_margin"} <= set(sweeper.params)
    check_overrides([f"{SEARCH}={name}", "hydra/launcher=slurm"])  # the CLI's option check lets both pass


def test_augment_strength_scales_magnitudes():
    spec = OmegaConf.to_container(compose_cfg("train").data.augment, resolve=True)
    assert scale_augment(spec, 1.0) == spec
    assert scale_augment(spec, 0.0) is None  # off, flips included
    double = scale_augment(spec, 2.0)
    assert double["RandomFlip"] == spec["RandomFlip"]
    assert double["RandomAffine"]["degrees"] == 2 * spec["RandomAffine"]["degrees"]
    assert double["RandomAffine"]["scales"] == pytest.approx(2 * spec["RandomAffine"]["scales"])
    assert double["RandomCorrelatedNoise"]["hu"] == pytest.approx([2 * v for v in spec["RandomCorrelatedNoise"]["hu"]])
    lo, hi = scale_augment({"RandomAnisotropy": {"downsampling": [1.0, 1.8]}}, 2.0)["RandomAnisotropy"]["downsampling"]
    assert (lo, hi) == pytest.approx((1.0, 2.6))  # the part above 1 scales
    half = scale_augment({"RandomAffine": {"scales": [0.9, 1.2]}}, 0.5)
    assert half["RandomAffine"]["scales"] == pytest.approx([0.95, 1.1])  # a range of factors shrinks towards 1
    with pytest.raises(Exception, match="augment_strength"):
        scale_augment(spec, -1)


def _trials(db: Path) -> list[tuple[int, str, float]]:
    with sqlite3.connect(db) as con:
        return con.execute(
            "SELECT t.number, t.state, v.value FROM trials t LEFT JOIN trial_values v USING (trial_id) ORDER BY t.number"
        ).fetchall()


def _val_auroc(run: Path) -> float:
    return json.loads((run / "results.json").read_text())["val"]["auroc"]


def test_optuna_search_stores_and_continues(tiny_cohort, cli_env, tmp_path):
    """2 trials, then a re-run with n_trials=1: the same study grows to 3 trials (the sweeper counts new
    trials only), each stored value being its run's val AUROC."""
    logs = tmp_path / "logs"
    args = [
        f"{SEARCH}=classification_optuna",
        "debug=smoke",
        f"data.cohort={tiny_cohort}",
        "data.val_fraction=0.5",
        "data.roi_size=32",
        "data.roi_margin=null",  # fixed: one ingest cache (shared with the other smoke runs)
        f"paths.log_dir={logs}",
    ]
    first = run_cli("ovcf.train", [*args, "hydra.sweeper.n_trials=2", f"hydra.sweep.dir={tmp_path / 'first'}"], cli_env, tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    db = logs / "optuna" / "classification.db"
    trials = _trials(db)
    assert [(n, s) for n, s, _ in trials] == [(0, "COMPLETE"), (1, "COMPLETE")]
    for number, _, value in trials:
        assert value == pytest.approx(_val_auroc(tmp_path / "first" / str(number)))

    again = run_cli("ovcf.train", [*args, "hydra.sweeper.n_trials=1", f"hydra.sweep.dir={tmp_path / 'again'}"], cli_env, tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "Study name: classification" in again.stderr + again.stdout
    resumed = _trials(db)
    assert resumed[:2] == trials and [(n, s) for n, s, _ in resumed[2:]] == [(2, "COMPLETE")]
    assert resumed[2][2] == pytest.approx(_val_auroc(tmp_path / "again" / "0"))  # job numbers restart per run
