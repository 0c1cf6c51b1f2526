"""`python -m ovcf.study`: every stage in one folder, choices by validation, skip and resume."""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
from conftest import STUDY_MODELS, compose_cfg, run_cli, study_args

from ovcf.study import STAGES, commands


def test_study_folder_holds_every_stage_and_the_choices(smoke_study):
    folder = smoke_study.folder
    manifest = json.loads((folder / "study.json").read_text())
    assert list(manifest["stages"]) == list(STAGES) and all(s["status"] == "done" for s in manifest["stages"].values())
    assert manifest["settings"]["debug"] == "smoke" and manifest["settings"]["seed"] == 0
    assert manifest["settings"]["segmenters"] == STUDY_MODELS["segmenters"] and "torch" in manifest["versions"]
    chosen = manifest["chosen"]
    for stage, key, metric in (("segmentation", "segmenter", "val_dice"), ("classification", "classifier", "val_auroc")):
        board = list(csv.DictReader(open(folder / stage / "leaderboard.csv")))
        assert board[0]["best"] == "*" and chosen[key]["model"] == board[0]["model"], "the best by validation"
        assert chosen[key][metric] == pytest.approx(float(board[0][metric]), abs=1e-3)
    assert os.path.isfile(chosen["segmenter"]["checkpoint"])
    assert len(chosen["data_hash"]) == 64
    patients = {r["pseudonym"] for r in csv.DictReader(open(folder / "masks" / "segment.csv"))}
    assert {p.name.removesuffix(".nii.gz") for p in (folder / "masks").glob("*.nii.gz")} == patients
    metrics = json.loads((folder / "evaluation" / "metrics.json").read_text())
    assert metrics["best"] == chosen["classifier"]["model"]
    assert chosen["classifier"]["external"]["auc"] == metrics["models"][metrics["best"]]["test"]["auc"]["value"]
    assert (folder / "report.html").read_bytes() == (folder / "evaluation" / "report.html").read_bytes()
    assert (folder / "system" / "configs" / "metadata.json").is_file()


def test_rerun_skips_finished_stages_and_other_settings_are_refused(smoke_study, phi_cohort):
    args = study_args(phi_cohort[0], smoke_study.folder)
    proc = run_cli("ovcf.study", args, smoke_study.env, smoke_study.root)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert all(f"[{stage}] done before, skipped" in proc.stdout for stage in STAGES)
    proc = run_cli("ovcf.study", [*args, "study.classifiers=[vgg16]"], smoke_study.env, smoke_study.root)
    assert proc.returncode == 2 and "other settings (classifiers)" in proc.stderr and "name=NEW" in proc.stderr


@pytest.mark.slow(seconds=600)  # 145 s of its own, and it starts first, so it builds the smoke study (about 7 min)
def test_a_study_killed_mid_epoch_resumes_to_the_same_metrics(smoke_study, phi_cohort, tmp_path):
    """The classifier stage is killed (SIGKILL, the whole process group) during the second epoch of its
    second run; the same command then keeps the first run, continues the second from its last.ckpt,
    and ends with the metrics of the uninterrupted study."""
    src, dst = smoke_study.folder, tmp_path / "study"
    for part in ("segmentation", "masks", "classification/0"):
        shutil.copytree(src / part, dst / part)
    manifest = json.loads((src / "study.json").read_text())
    manifest["stages"] = {k: manifest["stages"][k] for k in ("segmentation", "masks")}
    manifest["chosen"] = {"segmenter": manifest["chosen"]["segmenter"]}
    (dst / "study.json").write_text(json.dumps(manifest))  # a study whose first two stages had finished
    args = [*study_args(phi_cohort[0], dst), "stop_after=classification"]

    last = dst / "classification" / "1" / "checkpoints" / "last.ckpt"
    cmd = [sys.executable, "-m", "ovcf.study", *args]
    proc = subprocess.Popen(cmd, env=smoke_study.env, cwd=tmp_path, start_new_session=True, stdout=subprocess.PIPE, text=True)
    deadline = time.time() + 600
    while not last.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # the first epoch is saved; the second is under way
    output = proc.communicate()[0]
    assert last.exists(), output[-3000:]
    assert not (dst / "classification" / "1" / "results.json").exists(), "killed before the run ended"

    resumed = run_cli("ovcf.study", args, smoke_study.env, tmp_path)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert "Finished before" in resumed.stdout and f"Resuming from {last}" in resumed.stdout
    for run in ("0", "1"):
        a, b = (json.loads((d / "classification" / run / "results.json").read_text()) for d in (src, dst))
        for stage in ("val", "test"):
            assert b[stage] == pytest.approx(a[stage], abs=1e-6), f"run {run} {stage}"


def test_sweeps_go_to_the_launcher_and_the_rest_stays_local(tmp_path):
    cfg = compose_cfg("study", ["launcher=slurm", 'launcher_overrides=["hydra.launcher.partition=gpu"]', "seed=3"])
    argv = commands(cfg, tmp_path, tmp_path / "best.ckpt", debug="smoke")
    for stage in ("segmentation", "classification"):
        assert "hydra/launcher=slurm" in argv[stage] and "hydra.launcher.partition=gpu" in argv[stage] and "-m" in argv[stage]
        assert "resume=true" in argv[stage] and "seed=3" in argv[stage] and "debug=smoke" in argv[stage]
    assert not any(a.startswith(("hydra/launcher", "hydra.launcher")) for a in argv["masks"] + argv["evaluation"])
    assert f"ckpt={tmp_path / 'best.ckpt'}" in argv["masks"]
    assert f"data.predicted_masks={tmp_path / 'masks'}" in argv["classification"]
    assert not any(a.startswith("cv.folds") for a in argv["classification"]), "a debug cohort is too small to fold"
    full = commands(cfg, tmp_path, tmp_path / "best.ckpt")
    assert "cv.folds=3" in full["classification"], "classifiers are chosen by the mean over patient folds"


def test_on_a_cpu_a_sweeps_runs_go_side_by_side_into_the_multiruns_folders(tmp_path):
    """Without a launcher a sweep's runs start at once on a CPU (`jobs=null`), or `jobs` at a time, each
    as the plain `ovcf.train` run that the multirun would have made, in the folder it would have used."""
    import torch

    from ovcf.cli import side_by_side
    from ovcf.study import sweep_runs

    cfg = compose_cfg("study", ["seed=3"])
    assert cfg.jobs is None and compose_cfg("transfer").jobs is None
    assert side_by_side(cfg.jobs, 3) == (1 if torch.cuda.is_available() else 3) and side_by_side(None, 1) == 1
    assert side_by_side(2, 3) == 2 and side_by_side(5, 3) == 3
    assert side_by_side(2, 3, "slurm") == 1, "a launcher schedules its own"
    argv = commands(cfg, tmp_path, tmp_path / "best.ckpt")["classification"]
    runs = sweep_runs(argv, list(cfg.study.classifiers), tmp_path / "classification")
    assert list(runs) == list(cfg.study.classifiers)
    for i, (model, run) in enumerate(runs.items()):
        assert "-m" not in run and run[0] == "ovcf.train" and f"model={model}" in run
        assert f"hydra.run.dir={tmp_path / 'classification' / str(i)}" in run
        assert not any(a.startswith("hydra.sweep") for a in run)
        assert [a for a in run if not a.startswith(("model=", "hydra.run.dir="))] == [
            a for a in argv if a != "-m" and not a.startswith(("model=", "hydra.sweep.dir="))
        ], "every other argument as the multirun has it, in its order"
