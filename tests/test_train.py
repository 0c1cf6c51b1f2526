"""End to end: train + test writes checkpoints and results; a model learns; multirun works."""

from __future__ import annotations

import json

import lightning as L
import pytest
import torch
from conftest import compose_cfg, run_cli, synthetic_params

from ovcf.data import CohortDataModule
from ovcf.tasks import ClassificationTask


def test_smoke_run_writes_checkpoint_and_results(cli_env, tmp_path):
    run = tmp_path / "run"
    proc = run_cli("ovcf.train", ["debug=smoke", f"hydra.run.dir={run}"], cli_env, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "External test (center B" in proc.stdout
    results = json.loads((run / "results.json").read_text())
    assert results["task"] == "classification" and results["model"] == "densenet121"
    assert set(results["val"]) >= {"auroc", "accuracy", "sensitivity", "specificity", "loss"}
    assert set(results["test"]) >= {"auroc", "accuracy", "sensitivity", "specificity", "loss"}
    assert results["centers"] == {"dev": "A", "external": "B"}
    assert (run / "checkpoints" / "last.ckpt").is_file()
    assert (run / results["best_checkpoint"]).is_file()
    assert (run / "csv" / "metrics.csv").is_file()

    # A checkpoint loads without Hydra and predicts.
    model = ClassificationTask.load_from_checkpoint(run / "checkpoints" / "last.ckpt", map_location="cpu")
    assert model.hparams.model_name == "densenet121"
    with torch.no_grad():
        out = model.eval()(torch.rand(2, 1, 48, 48, 48))
    assert out.shape == (2,)


def test_multirun_writes_one_result_per_model(cli_env, tmp_path):
    sweep = tmp_path / "sweep"
    args = ["-m", "model=densenet121,densenet121_3d", "debug=smoke", f"hydra.sweep.dir={sweep}", "data.roi_size=32"]
    proc = run_cli("ovcf.train", args, cli_env, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    models = {json.loads((sweep / str(i) / "results.json").read_text())["model"] for i in (0, 1)}
    assert models == {"densenet121", "densenet121_3d"}


@pytest.mark.slow
def test_model_learns_easy_cohort(tmp_path):
    """On a cohort where every fracture shows its label's signs, val AUROC must reach 0.8."""
    L.seed_everything(0, workers=True)
    cfg = compose_cfg("train", ["synthetic=easy"], tmp_path)
    params = synthetic_params("easy", patients_per_center=24, n_levels=[5, 5])
    dm = CohortDataModule(
        synthetic=params,
        cache_dir=str(tmp_path / "cache"),
        key_file=str(tmp_path / "key"),
        val_fraction=0.34,
        roi_size=32,
        roi_spacing=1.8,
        batch_size=8,
        progress=False,
    )
    model = ClassificationTask("densenet121", dict(cfg.model.model_kwargs, slice_step=2), lr=1e-3)
    trainer = L.Trainer(
        max_epochs=12,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        deterministic=True,
        num_sanity_val_steps=0,
        enable_model_summary=False,
    )
    trainer.fit(model, datamodule=dm)
    val = trainer.validate(model, datamodule=dm, verbose=False)[0]
    assert len(dm.datasets["val"]) >= 10
    assert val["val/auroc"] >= 0.8, val
