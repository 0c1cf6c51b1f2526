"""Optuna searches (`python -m ovcf.tune hparams_search=...`): the configs compose into a search space of
existing keys, augmentation strength scales the transforms, a search stores its trials and a re-run
adds only the missing ones, a trial killed mid-run is failed and run again, and the journal storage
lets several processes share one study."""

from __future__ import annotations

import json
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from conftest import compose_cfg, run_cli
from omegaconf import OmegaConf, open_dict

from ovcf.cli import check_overrides
from ovcf.data.augment import scale_augment
from ovcf.errors import ConfigError
from ovcf.tune import open_storage, search_space

SEARCH = "hparams_search"


@pytest.mark.parametrize(
    ("name", "metric", "task", "keys"),
    [
        ("classification_optuna", "val/auroc", "classification", {"data.augment_strength", "data.roi_margin"}),
        ("segmentation_optuna", "val/dice", "segmentation", {"data.foreground"}),
    ],
)
def test_search_configs_compose(name, metric, task, keys):
    from hydra.utils import instantiate

    cfg = compose_cfg("train", [f"{SEARCH}={name}"])
    assert cfg.optimized_metric == metric and cfg.task == task and "hydra" not in cfg
    tune = cfg.tune
    assert tune.direction == "maximize" and tune.storage == "sqlite" and tune.n_trials > 0
    assert set(search_space(cfg, set())) == {"model.lr", "model.weight_decay", *keys}  # every key exists in train's config
    assert isinstance(instantiate(tune.sampler), optuna.samplers.TPESampler)
    assert isinstance(instantiate(tune.pruner), optuna.pruners.MedianPruner)
    assert set(search_space(cfg, {"model.lr"})) == {"model.weight_decay", *keys}  # fixed on the command line
    check_overrides([f"{SEARCH}={name}", "model=unet" if task == "segmentation" else "model=densenet121"])


def test_search_space_names_a_wrong_key_or_type():
    cfg = compose_cfg("train", [f"{SEARCH}=classification_optuna"])
    with open_dict(cfg):
        cfg.tune.params["model.lrr"] = {"type": "float", "low": 1e-4, "high": 1e-2}
    with pytest.raises(ConfigError, match=r"'model\.lrr' is not a key of the train config"):
        search_space(cfg, set())
    with open_dict(cfg):
        del cfg.tune.params["model.lrr"]
        cfg.tune.params["model.lr"] = {"type": "uniform", "low": 1e-4, "high": 1e-2}
    with pytest.raises(ConfigError, match=r"tune\.params\.model\.lr: type 'uniform'"):
        search_space(cfg, set())
    with open_dict(cfg):
        cfg.tune.params["model.lr"] = {"type": "float", "low": 1e-4}
    with pytest.raises(ConfigError, match=r"tune\.params\.model\.lr: a float takes .*missing high"):
        search_space(cfg, set())


def test_storage_that_cannot_be_written_is_named(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    for spec, folder in [("sqlite", blocker / "optuna"), (str(blocker / "sub" / "study.log"), tmp_path)]:
        with pytest.raises(ConfigError, match=r"tune\.storage=.*cannot write in .*a_file"):
            open_storage(spec, folder, "s")
    with pytest.raises(ConfigError, match="use sqlite, journal"):
        open_storage("study.txt", tmp_path, "s")


def test_journal_storage_is_shared_by_processes(tmp_path):
    """Two workers (each with its own storage object on the journal file, as two SLURM jobs) fill one
    study up to the trial count: the second sees the first's trials and runs only the missing one."""
    path = tmp_path / "optuna" / "shared.log"

    def worker(n_trials: int | None) -> optuna.Study:
        storage = open_storage(str(path), tmp_path, "shared")
        study = optuna.create_study(study_name="shared", storage=storage, direction="maximize", load_if_exists=True)
        stop = optuna.study.MaxTrialsCallback(3, states=(optuna.trial.TrialState.COMPLETE,))
        study.optimize(lambda t: -((t.suggest_float("x", -1, 1) - 0.5) ** 2), n_trials=n_trials, callbacks=[stop])
        return study

    assert isinstance(open_storage("journal", tmp_path / "optuna", "other"), optuna.storages.JournalStorage)
    assert len(worker(2).trials) == 2
    assert [t.number for t in worker(None).trials] == [0, 1, 2]  # stopped by the count of the whole study
    assert path.is_file() and len(path.read_text().splitlines()) > 3  # one JSON line per operation, never a pickle
    json.loads(path.read_text().splitlines()[0])


def test_pruning_reads_the_fit_epochs_only():
    """The callback reports each validation epoch of the fit and prunes there; the validation of the best
    checkpoint after the fit is no epoch and never prunes a finished run."""
    from types import SimpleNamespace

    import torch
    from lightning.pytorch.trainer.states import TrainerFn

    from ovcf.tune import pruning_callback

    trial = optuna.create_study(direction="maximize", pruner=optuna.pruners.ThresholdPruner(lower=0.9)).ask()
    callback = pruning_callback(trial, "val/auroc")

    def trainer(fn, auroc):
        metrics = {"val/auroc": torch.tensor(auroc)}
        return SimpleNamespace(state=SimpleNamespace(fn=fn), sanity_checking=False, callback_metrics=metrics)

    callback.on_validation_end(trainer(TrainerFn.FITTING, 0.95), SimpleNamespace(current_epoch=0))
    callback.on_validation_end(trainer(TrainerFn.VALIDATING, 0.5), SimpleNamespace(current_epoch=1))  # after the fit
    assert trial.storage.get_trial(trial._trial_id).intermediate_values == {0: pytest.approx(0.95)}
    with pytest.raises(optuna.TrialPruned):
        callback.on_validation_end(trainer(TrainerFn.FITTING, 0.5), SimpleNamespace(current_epoch=1))


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


def _trials(db: Path) -> list[tuple[int, str, float | None]]:
    with sqlite3.connect(db) as con:
        return con.execute(
            "SELECT t.number, t.state, v.value FROM trials t LEFT JOIN trial_values v USING (trial_id) ORDER BY t.number"
        ).fetchall()


def _val_auroc(run: Path) -> float:
    return json.loads((run / "results.json").read_text())["val"]["auroc"]


def _search_args(cohort: Path, logs: Path, *extra: str) -> list[str]:
    return [
        f"{SEARCH}=classification_optuna",
        "debug=smoke",
        f"data.cohort={cohort}",
        "data.val_fraction=0.5",
        "data.roi_size=32",
        "data.roi_margin=null",  # fixed: one ingest cache (shared with the other smoke runs)
        f"paths.log_dir={logs}",
        *extra,
    ]


@pytest.mark.slow(seconds=62)
def test_search_stores_trials_and_runs_only_the_missing(tiny_cohort, cli_env, tmp_path):
    """`ovcf.train hparams_search=...` hands over to ovcf.tune: 2 trials; then tune.n_trials=3 adds exactly
    one (the stored ones count), each stored value being its run's val AUROC."""
    logs = tmp_path / "logs"
    first = run_cli("ovcf.train", _search_args(tiny_cohort, logs, "tune.n_trials=2"), cli_env, tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "runs in python -m ovcf.tune now" in first.stderr
    db, study = logs / "optuna" / "classification.db", logs / "tune" / "classification"
    trials = _trials(db)
    assert [(n, s) for n, s, _ in trials] == [(0, "COMPLETE"), (1, "COMPLETE")]
    for number, _, value in trials:
        assert value == pytest.approx(_val_auroc(study / f"trial_{number}"))

    again = run_cli("ovcf.tune", _search_args(tiny_cohort, logs, "tune.n_trials=3"), cli_env, tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "Study classification: 2 of tune.n_trials=3 trials finished" in again.stdout
    resumed = _trials(db)
    assert resumed[:2] == trials and [(n, s) for n, s, _ in resumed[2:]] == [(2, "COMPLETE")]
    assert resumed[2][2] == pytest.approx(_val_auroc(study / "trial_2"))
    stored = optuna.load_study(study_name="classification", storage=f"sqlite:///{db}")
    assert all("data.roi_margin" not in t.params and "model.lr" in t.params for t in stored.trials)  # fixed, not searched
    assert all(t.intermediate_values == {0: pytest.approx(t.value)} for t in stored.trials)  # the pruning callback: one epoch
    board = (study / "leaderboard.csv").read_text().splitlines()
    assert len(board) == 4 and board[1].startswith("*,") and f",{stored.best_trial.number},COMPLETE," in board[1]
    assert f"Best trial {stored.best_trial.number}: val/auroc {stored.best_value:.4f}" in again.stdout


@pytest.mark.slow(seconds=79)
def test_a_killed_search_continues(tiny_cohort, cli_env, tmp_path):
    """SIGKILL while trial 0 trains: it stays RUNNING; the next run fails it (no heartbeat for the grace
    period), runs it again with the same values, and ends with the requested number of complete trials."""
    logs = tmp_path / "logs"
    args = _search_args(tiny_cohort, logs, "tune.n_trials=1", "tune.heartbeat_interval=1", "tune.grace_period=2")
    db = logs / "optuna" / "classification.db"
    with open(tmp_path / "killed.log", "w") as log:  # what the killed search printed, for a failing test
        proc = subprocess.Popen([sys.executable, "-m", "ovcf.tune", *args], env=cli_env, cwd=tmp_path, stdout=log, stderr=log)
    query = "SELECT count(*) FROM trials t JOIN trial_heartbeats h USING (trial_id) WHERE t.state = 'RUNNING'"
    deadline = time.time() + 300
    try:
        while True:  # until trial 0 runs and has sent a heartbeat
            assert proc.poll() is None and time.time() < deadline, "the search ended before its trial could be killed"
            if db.is_file():
                try:
                    with sqlite3.connect(db) as con:
                        if con.execute(query).fetchone()[0] == 1:
                            break
                except sqlite3.OperationalError:  # the tables are being created
                    pass
            time.sleep(0.2)
        time.sleep(1)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert [(n, s) for n, s, _ in _trials(db)] == [(0, "RUNNING")]
    time.sleep(3)  # past the grace period

    again = run_cli("ovcf.tune", args, cli_env, tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "Trials [0]: their process died" in again.stdout
    assert [(n, s) for n, s, _ in _trials(db)] == [(0, "FAIL"), (1, "COMPLETE")]
    study = optuna.load_study(study_name="classification", storage=f"sqlite:///{db}")
    killed, retry = study.trials
    assert retry.system_attrs["failed_trial"] == 0 and retry.params == killed.params  # the same values, again
    assert retry.value == pytest.approx(_val_auroc(logs / "tune" / "classification" / "trial_1"))
