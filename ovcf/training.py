"""One training run as a library: fit on one center, test on the other (or patient folds of one).

`python -m ovcf.train` is its command line; `python -m ovcf.tune` calls `train` within its own
process once per Optuna trial, handing it the pruning callback that reads each validation epoch.
It lives here, not in the entry point, because no module imports an entry point.

Writes into the run folder: checkpoints (best by the optimized metric, and last), CSV (and W&B)
logs, `results.json` with the final validation and external-test metrics, and
`test_predictions.csv`. Returns the optimized metric. A cohort of one center
has no external test: `results.json` then holds `"test": null` and a `note` that its figures are
internal validation (patient folds), and no `test_predictions.csv` is written.
"""

from __future__ import annotations

import csv
import json
import logging
import time
from collections.abc import Sequence
from pathlib import Path

import hydra
import lightning as L
import numpy as np
import torch
from lightning.pytorch.loggers import WandbLogger
from omegaconf import DictConfig, OmegaConf, open_dict

from ovcf.atomic import write_json
from ovcf.cli import job_overrides, resolve_cohort
from ovcf.data.ct import IngestChecks
from ovcf.data.ingest import cache_fingerprint
from ovcf.data.splits import one_center_note
from ovcf.errors import ConfigError
from ovcf.eval.leaderboard import check_line
from ovcf.eval.metrics import binary_scores
from ovcf.eval.predictions import write_predictions
from ovcf.inference.models import check_on_ct
from ovcf.models.registry import model_task
from ovcf.tasks.checkpoint import read_checkpoint

log = logging.getLogger(__name__)


def _strip(metrics: dict, prefix: str) -> dict:
    return {k.split("/", 1)[1]: float(v) for k, v in metrics.items() if k.startswith(prefix + "/")}


def summary(results: dict) -> str:
    """One line on the external test, in the task's own metrics (on validation when there is none)."""
    t, v, ext = results["test"], results["val"], results["centers"]["external"]
    if ext is None:  # one center: the validation figures, with the note that they are internal
        if results["task"] == "segmentation":
            figures = f"val Dice {v['dice']:.3f}"
        else:
            figures = f"val AUROC {v['auroc']:.3f}, sensitivity {v['sensitivity']:.3f}, specificity {v['specificity']:.3f}"
        return f"{results['note']}.\nInternal validation (center {results['centers']['dev']}): {figures}"
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


def train(cfg: DictConfig, callbacks: Sequence[L.Callback] = ()) -> float:
    """Runs fit, then validate and test with the best checkpoint (per fold with `cv.folds` > 1);
    returns `cfg.optimized_metric` on validation (the mean over folds).

    `callbacks` join the configured ones in the fit of a single model (ovcf.tune's pruning callback);
    a cross-validation run takes none, since each fold would report its epochs as the same steps."""
    if not cfg.optimized_metric.startswith("val/"):
        raise ConfigError(f"optimized_metric={cfg.optimized_metric}: models are chosen on validation metrics only (val/...)")
    serves = model_task(cfg.model.model_name)
    if serves is not None and serves != cfg.task:  # unknown names fail at instantiation with the list of names
        raise ConfigError(f"model {cfg.model.model_name} is a {serves} model, not {cfg.task}: add task={serves}")
    folds = int(cfg.get("cv", {}).get("folds") or 1)
    if folds > 1 and callbacks:
        raise ValueError("callbacks are for a single-model fit, not for the folds of cv.folds > 1")
    if folds > 1:
        results = cross_validate(cfg, folds)
    else:
        results = fit_and_test(cfg, Path(cfg.paths.output_dir), callbacks=callbacks)
    log.info(f"{summary(results)}\nResults: {Path(cfg.paths.output_dir) / 'results.json'}")
    return results["val"][cfg.optimized_metric.removeprefix("val/")]


def finished(cfg: DictConfig, out: Path) -> dict | None:
    """With `resume=true`, the results of a run that already ended in `out` (it is not trained again)."""
    path = out / "results.json"
    if not cfg.get("resume") or not path.is_file():
        return None
    log.info(f"Finished before: {path} (resume=true skips it)")
    return json.loads(path.read_text())


def resume_from(cfg: DictConfig, out: Path) -> str | None:
    """`ckpt_path` if given; with `resume=true`, the run's own `last.ckpt` when an earlier attempt left one.

    The checkpoint is read once here with the weights-only loader, so a file that is not a plain
    checkpoint is refused in one line that names it, before Lightning opens it."""
    if cfg.get("ckpt_path") or not cfg.get("resume"):
        path = cfg.get("ckpt_path")
    else:
        last = out / "checkpoints" / "last.ckpt"
        path = str(last) if last.is_file() else None
        if path:
            log.info(f"Resuming from {last}")
    if path:
        if not Path(path).expanduser().is_file():
            raise ConfigError(f"ckpt_path={path} not found; pass a checkpoint of an earlier ovcf.train run")
        read_checkpoint(Path(path).expanduser())
    return path


def evaluation_trainer(cfg: DictConfig, trainer: L.Trainer) -> L.Trainer:
    """After a distributed fit, process 0 validates and tests on one device and the others stop:
    val and test sets are not sharded, so each process would score them whole and wait on the rest."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()  # strategy=ddp: every process ran the fit itself
    if trainer.global_rank != 0:
        raise SystemExit(0)
    loggers = [hydra.utils.instantiate(lg) for lg in (cfg.get("logger") or {}).values()]  # the fit's files stay as they are
    return hydra.utils.instantiate(
        cfg.trainer, devices=1, num_nodes=1, strategy="auto", sync_batchnorm=False, callbacks=[], logger=loggers
    )


class StopAfterEpoch(L.Callback):
    """Ends the fit after epoch `epoch` (0-based) of the configured schedule, which stays as it is."""

    def __init__(self, epoch: int):
        self.epoch = int(epoch)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.current_epoch >= self.epoch:
            trainer.should_stop = True


def fit_and_test(cfg: DictConfig, out: Path, stop_epoch: int | None = None, callbacks: Sequence[L.Callback] = ()) -> dict:
    """One model: fit, validate and test with the best checkpoint; writes results.json (and predictions) into `out`.

    With `stop_epoch` (a refit on every development patient: no validation set), the fit stops
    after that epoch and its weights are tested. `callbacks` are added to the configured ones."""
    done = finished(cfg, out)
    if done is not None:
        return done
    L.seed_everything(cfg.seed, workers=True)
    model = hydra.utils.instantiate(cfg.model)  # a bad model config fails before any data work
    resolve_cohort(cfg)  # the synthetic cohort is generated here on first use, not by the data module
    datamodule = hydra.utils.instantiate(cfg.data)
    callbacks = [*(hydra.utils.instantiate(c) for c in (cfg.get("callbacks") or {}).values()), *callbacks]
    extra = {}
    if stop_epoch is not None:
        callbacks.append(StopAfterEpoch(stop_epoch))
        extra["limit_val_batches"] = 0
    loggers = [hydra.utils.instantiate(lg) for lg in (cfg.get("logger") or {}).values()]
    trainer = hydra.utils.instantiate(cfg.trainer, callbacks=callbacks, logger=loggers, **extra)
    for lg in loggers:
        lg.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))

    datamodule.prepare_data()
    datamodule.setup("fit")
    log.info(datamodule.summary())
    fit_model = model
    if cfg.get("compile"):
        fit_model = torch.compile(model)  # Lightning saves the plain module's weights
    start = time.time()
    # weights_only: a checkpoint is read as tensors and plain values, never as code (ovcf.tasks.checkpoint)
    trainer.fit(fit_model, datamodule=datamodule, ckpt_path=resume_from(cfg, out), weights_only=True)
    fit_seconds = time.time() - start

    checkpoint = trainer.checkpoint_callback
    best = checkpoint.best_model_path if checkpoint is not None and checkpoint.best_model_path else None
    if trainer.world_size > 1:
        trainer = evaluation_trainer(cfg, trainer)
    score = {"datamodule": datamodule, "ckpt_path": best, "verbose": False, "weights_only": True}
    val = {} if stop_epoch is not None else trainer.validate(fit_model, **score)[0]
    external = datamodule.centers["external"] is not None  # one center: no test set, nothing to test
    test = trainer.test(fit_model, **score)[0] if external else None

    results = {
        "task": cfg.task,
        "model": cfg.model.model_name,
        "overrides": job_overrides(),
        "val": _strip(val, "val"),
        "test": _strip(test, "test") if external else None,
        "centers": datamodule.centers,
        **({} if external else {"note": one_center_note(datamodule.centers["dev"])}),
        "n": {name: len(getattr(ds, "volumes", ds)) for name, ds in datamodule.datasets.items()},  # samples or scans
        "best_checkpoint": str(Path(best).relative_to(out)) if best else None,
        **({"stop_epoch": stop_epoch} if stop_epoch is not None else {}),
        "seed": cfg.seed,
        "data_hash": cache_fingerprint(datamodule.cache),  # ingest's hash of the cohort files and settings
        "fit_seconds": round(fit_seconds, 1),
        "params": sum(p.numel() for p in model.parameters()),
    }
    if hasattr(model, "per_level_dice"):
        stages = ("val", "test") if external else ("val",)
        results["per_level_dice"] = {stage: model.per_level_dice(stage) for stage in stages}
        results["fracture_dice"] = {stage: model.fracture_dice(stage) for stage in stages}
        if cfg.get("check_ct"):  # labelled CTs outside the cohort (a real scan): reported, never used to choose
            settings = {"hu_window": tuple(cfg.data.hu_window), "spacing": float(cfg.data.volume_spacing)}
            results["check"] = check_on_ct(model, settings, cfg.check_ct, IngestChecks.from_config(cfg.get("ingest")))
            for c in results["check"]:
                log.info(f"Check on {check_line(c)}")
    write_json(out / "results.json", results, indent=2)
    write_json(out / "splits.json", datamodule.splits)  # which patients trained, validated, tested
    if external and hasattr(model, "test_predictions"):
        write_predictions(out / "test_predictions.csv", model.test_predictions)
    if any(isinstance(lg, WandbLogger) for lg in loggers):
        import wandb

        wandb.finish()  # a multirun (or a CV run) starts a new W&B run per model
    return results


CV_TEST = {
    "ensemble": "the fold models' mean probability",
    "refit": "one model refit on every development patient",
}


SHARED = ("task", "model", "overrides", "centers", "note", "seed", "data_hash", "params")  # a CV run's, from its folds


def cross_validate(cfg: DictConfig, folds: int) -> dict:
    """`cv.folds` patient folds of the development center: one model per fold (in `fold_<k>/`), val
    metrics as mean and sd over folds, and the external test scored once, by the fold ensemble (mean
    probability) or by a model refit on every development patient (`cv.test=refit`, in `refit/`).
    The external center never enters a fold. A one-center cohort has no external test: the results
    are the folds' validation figures (each fold's own patients, out of fold), and a refit model is
    still trained (the model to export) but not tested."""
    if cfg.task != "classification":
        raise ConfigError("cv.folds > 1 is for task=classification; segmenters use one validation fold")
    mode = cfg.cv.get("test", "ensemble")
    if mode not in CV_TEST:
        raise ConfigError(f"cv.test={mode}: use " + " or ".join(f"{k} ({v})" for k, v in CV_TEST.items()))
    out = Path(cfg.paths.output_dir)
    done = finished(cfg, out)
    if done is not None:
        return done
    runs = []
    for k in range(folds):
        log.info(f"Fold {k + 1} of {folds}")
        runs.append(fit_and_test(_member_cfg(cfg, out / f"fold_{k}", folds, k), out / f"fold_{k}"))
    external = runs[0]["centers"]["external"] is not None
    if mode == "refit":
        test, predictions, extra = refit(cfg, out, folds, runs)
    else:
        test, predictions = fold_ensemble(out, folds) if external else (None, None)
        extra = {}
    vals = {key: [r["val"][key] for r in runs] for key in runs[0]["val"]}
    results = {
        **{key: runs[0][key] for key in SHARED if key in runs[0]},
        "val": {key: float(np.mean(v)) for key, v in vals.items()},
        "val_sd": {key: float(np.std(v, ddof=1)) for key, v in vals.items()},
        "test": test,
        "cv": {"folds": folds, "test": mode, **extra},
        "folds": [{"fold": k, "val": r["val"], "test": r["test"], "n": r["n"]} for k, r in enumerate(runs)],
        "n": {
            "train+val": sum(runs[0]["n"][s] for s in ("train", "val")),
            **({"test": runs[0]["n"]["test"]} if external else {}),
        },
        "fit_seconds": round(sum(r["fit_seconds"] for r in runs) + extra.get("refit_seconds", 0.0), 1),
    }
    write_json(out / "results.json", results, indent=2)
    if predictions is not None:
        write_predictions(out / "test_predictions.csv", predictions)
    sd = results["val_sd"]["auroc"]
    test_line = f"test = {CV_TEST[mode]}" if external else "no external test"
    log.info(f"Cross-validation ({folds} folds): val AUROC {results['val']['auroc']:.3f} +- {sd:.3f}; {test_line}")
    return results


def _member_cfg(cfg: DictConfig, out: Path, folds: int, fold: int | None) -> DictConfig:
    """The config of one model of a CV run, written to `out`: `fold` validates (None: a refit, all train)."""
    member = cfg.copy()
    with open_dict(member):
        member.data.val_fraction = 1.0 / folds
        member.data.fold = fold
        member.paths.output_dir = str(out)
    out.mkdir(parents=True, exist_ok=True)
    return member


def _scores(rows: list[dict]) -> dict:
    """Binary metrics of prediction rows (probability, label), as a run's test epoch computes them."""
    return binary_scores([int(r["label"]) for r in rows], [float(r["probability"]) for r in rows])


def fold_ensemble(out: Path, folds: int) -> tuple[dict, list[dict]]:
    """The external test scored by the mean probability of the fold models (their columns kept)."""
    predictions = [list(csv.DictReader(open(out / f"fold_{k}" / "test_predictions.csv"))) for k in range(folds)]
    ensemble = []
    for rows in zip(*predictions):
        probs = [float(r["probability"]) for r in rows]
        row = {"id": rows[0]["id"], "label": int(rows[0]["label"]), "probability": float(np.mean(probs))}
        ensemble.append(row | {f"fold_{k}": p for k, p in enumerate(probs)})
    return _scores(ensemble), ensemble


def refit(cfg: DictConfig, out: Path, folds: int, runs: list[dict]) -> tuple[dict | None, list[dict] | None, dict]:
    """`cv.test=refit`: one more model on every development patient (`refit/`), trained on the folds'
    schedule and stopped at the median of the epochs their validation chose: with no patient left
    to validate on, the folds pick the epoch. It alone scores the external center."""
    epochs = [int(read_checkpoint(out / f"fold_{k}" / r["best_checkpoint"])["epoch"]) for k, r in enumerate(runs)]
    stop = int(np.median(epochs))
    refit_cfg = _member_cfg(cfg, out / "refit", folds, None)  # every development patient trains
    with open_dict(refit_cfg):
        if "model_checkpoint" in (refit_cfg.get("callbacks") or {}):
            refit_cfg.callbacks.model_checkpoint.monitor = None  # nothing to monitor: keep the last epoch
    log.info(f"Refit on every development patient: epochs 1 to {stop + 1} (the folds' best epochs: {[e + 1 for e in epochs]})")
    result = fit_and_test(refit_cfg, out / "refit", stop_epoch=stop)
    rows = None  # a one-center cohort: nothing to test
    if result["test"] is not None:
        rows = list(csv.DictReader(open(out / "refit" / "test_predictions.csv")))
        rows = [{"id": r["id"], "label": int(r["label"]), "probability": float(r["probability"])} for r in rows]
    extra = {"refit_epoch": stop + 1, "fold_epochs": [e + 1 for e in epochs], "refit_seconds": result["fit_seconds"]}
    return result["test"], rows, extra
