"""Every config option composes, and everything it names instantiates."""

from __future__ import annotations

from pathlib import Path

import hydra
import lightning as L
import pytest
import torch
from conftest import compose_cfg

from ovcf.cli import config_dir
from ovcf.data import CohortDataModule
from ovcf.models.registry import model_task
from ovcf.tasks import ClassificationTask, SegmentationTask

GROUPS = ["data", "data/augment", "synthetic", "task", "model", "trainer", "callbacks", "logger", "paths", "experiment", "debug"]
TASK_CLASSES = {"classification": ClassificationTask, "segmentation": SegmentationTask}


def _options(group: str) -> list[str]:
    return sorted(p.stem for p in (Path(config_dir()) / group).glob("*.yaml"))


@pytest.mark.parametrize("group,option", [(g, o) for g in GROUPS for o in _options(g)])
def test_option_composes_and_instantiates(group, option, tmp_path, monkeypatch, tiny_cohort):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    overrides = [f"{group}={option}"]
    if group == "model":  # a model option composes with its own task
        name = compose_cfg("train", overrides).model.model_name
        overrides.append(f"task={model_task(name)}")
    cfg = compose_cfg("train", overrides, tmp_path)
    cfg.data.cohort = str(tiny_cohort)  # the entry point's choice (ovcf.cli.resolve_cohort); nothing is read yet
    data = hydra.utils.instantiate(cfg.data)
    assert isinstance(data, CohortDataModule)
    model = hydra.utils.instantiate(cfg.model)
    assert isinstance(model, TASK_CLASSES[cfg.task])
    callbacks = [hydra.utils.instantiate(c) for c in cfg.callbacks.values()]
    loggers = [hydra.utils.instantiate(lg) for lg in cfg.logger.values()]
    if cfg.trainer.accelerator == "gpu" and not torch.cuda.is_available():
        cfg.trainer.accelerator = "cpu"  # the rest of the option must still instantiate here
    trainer = hydra.utils.instantiate(cfg.trainer, callbacks=callbacks, logger=loggers)
    assert isinstance(trainer, L.Trainer)
    assert any(lg.__class__.__name__ == "CSVLogger" for lg in loggers), "CSV logging is always on"
    assert cfg.optimized_metric.startswith("val/")


def test_synth_config_composes():
    cfg = compose_cfg("synth", ["out=/tmp/x", "patients_per_center=3", "seed=7"])
    assert cfg.patients_per_center == 3 and cfg.seed == 7 and set(cfg.centers) == {"A", "B"}


def test_every_model_option_is_a_registered_network():
    from ovcf.models import list_models

    for option in _options("model"):
        assert compose_cfg("train", [f"model={option}"]).model.model_name in list_models()


def test_default_logger_is_wandb_offline_plus_csv(monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    cfg = compose_cfg("train")
    assert set(cfg.logger) == {"csv", "wandb"}
    assert cfg.logger.wandb.mode == "offline"
    assert set(compose_cfg("train", ["logger=csv"]).logger) == {"csv"}


def test_a_model_of_another_task_is_a_config_error(tmp_path):
    from ovcf.errors import ConfigError
    from ovcf.train import train

    with pytest.raises(ConfigError, match="add task=segmentation"):
        train(compose_cfg("train", ["model=umamba"], tmp_path))
