"""`python -m ovcf.train model=densenet121` or `task=segmentation model=unet`: fit on one center, test on the other.

Writes into the run folder: checkpoints (best by the optimized metric, and last), CSV (and W&B)
logs, `results.json` with the final validation and external-test metrics, and
`test_predictions.csv`. Returns the optimized metric for Hydra sweepers.
"""

from __future__ import annotations

import csv
import json
import time
from pathlib import Path

import hydra
import lightning as L
from lightning.pytorch.loggers import WandbLogger
from omegaconf import DictConfig, OmegaConf

from ovcf.cli import check_overrides, config_dir, guarded
from ovcf.errors import ConfigError


def _strip(metrics: dict, prefix: str) -> dict:
    return {k.split("/", 1)[1]: float(v) for k, v in metrics.items() if k.startswith(prefix + "/")}


def summary(results: dict) -> str:
    """One line on the external test, in the task's own metrics."""
    t, v, ext = results["test"], results["val"], results["centers"]["external"]
    if results["task"] == "segmentation":
        return (
            f"External test (center {ext}, {results['n']['test']} scans): mean Dice {t['dice']:.3f}, "
            f"level accuracy {t.get('level_accuracy', float('nan')):.3f}  |  val Dice {v['dice']:.3f}"
        )
    return (
        f"External test (center {ext}, {results['n']['test']} vertebrae): "
        f"AUROC {t['auroc']:.3f}, sensitivity {t['sensitivity']:.3f}, specificity {t['specificity']:.3f}, "
        f"accuracy {t['accuracy']:.3f}  |  val AUROC {v['auroc']:.3f}"
    )


def train(cfg: DictConfig) -> float:
    """Runs fit, then validate and test with the best checkpoint; returns `cfg.optimized_metric`."""
    if not cfg.optimized_metric.startswith("val/"):
        raise ConfigError(f"optimized_metric={cfg.optimized_metric}: models are chosen on validation metrics only (val/...)")
    from ovcf.models.registry import model_task

    serves = model_task(cfg.model.model_name)
    if serves is not None and serves != cfg.task:  # unknown names fail at instantiation with the list of names
        raise ConfigError(f"model {cfg.model.model_name} is a {serves} model, not {cfg.task}: add task={serves}")
    L.seed_everything(cfg.seed, workers=True)
    out = Path(cfg.paths.output_dir)
    datamodule = hydra.utils.instantiate(cfg.data)
    model = hydra.utils.instantiate(cfg.model)
    callbacks = [hydra.utils.instantiate(c) for c in (cfg.get("callbacks") or {}).values()]
    loggers = [hydra.utils.instantiate(lg) for lg in (cfg.get("logger") or {}).values()]
    trainer = hydra.utils.instantiate(cfg.trainer, callbacks=callbacks, logger=loggers)
    for lg in loggers:
        lg.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))

    datamodule.prepare_data()
    datamodule.setup("fit")
    print(datamodule.summary())
    start = time.time()
    trainer.fit(model, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"))
    fit_seconds = time.time() - start

    checkpoint = trainer.checkpoint_callback
    best = checkpoint.best_model_path if checkpoint is not None and checkpoint.best_model_path else None
    val = trainer.validate(model, datamodule=datamodule, ckpt_path=best, verbose=False)[0]
    test = trainer.test(model, datamodule=datamodule, ckpt_path=best, verbose=False)[0]

    results = {
        "task": cfg.task,
        "model": cfg.model.model_name,
        "val": _strip(val, "val"),
        "test": _strip(test, "test"),
        "centers": datamodule.centers,
        "n": {name: len(getattr(ds, "volumes", ds)) for name, ds in datamodule.datasets.items()},  # samples or scans
        "best_checkpoint": str(Path(best).relative_to(out)) if best else None,
        "seed": cfg.seed,
        "fit_seconds": round(fit_seconds, 1),
        "params": sum(p.numel() for p in model.parameters()),
    }
    if hasattr(model, "per_level_dice"):
        results["per_level_dice"] = {stage: model.per_level_dice(stage) for stage in ("val", "test")}
        results["fracture_dice"] = {stage: model.fracture_dice(stage) for stage in ("val", "test")}
    (out / "results.json").write_text(json.dumps(results, indent=2))
    (out / "splits.json").write_text(json.dumps(datamodule.splits, indent=1))  # which patients trained, validated, tested
    if hasattr(model, "test_predictions"):
        with open(out / "test_predictions.csv", "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=["id", "label", "probability"])
            writer.writeheader()
            writer.writerows(model.test_predictions)
    print(f"{summary(results)}\nResults: {out / 'results.json'}")
    if any(isinstance(lg, WandbLogger) for lg in loggers):
        import wandb

        wandb.finish()  # a multirun starts a new W&B run per job
    return results["val"][cfg.optimized_metric.removeprefix("val/")]


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="train")
def main(cfg: DictConfig) -> float:
    return guarded(train, cfg)


if __name__ == "__main__":
    import sys

    check_overrides(sys.argv[1:])
    main()
