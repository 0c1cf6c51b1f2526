"""Acute probabilities of a trained run on its validation fold(s) and on an external cohort.

A run is a `python -m ovcf.train` folder: one model (`results.json` names its best checkpoint), or
a cross-validation run (`fold_<k>/`, one model per fold, and `refit/` with `cv.test=refit`).
Validation predictions come from each model on its own validation fold (out of fold), so the
threshold is chosen on the development center only; the external rows are scored by every fold
model and averaged (the fold ensemble), or by the refit model. A run on a one-center cohort has no
external rows: only its validation records, unless another cohort is given to score.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ovcf.data.ct import IngestChecks
from ovcf.data.datamodule import CohortDataModule, load_samples
from ovcf.data.ingest import check_cohort, ingest, read_index
from ovcf.data.roi import RoiSpec
from ovcf.errors import ConfigError
from ovcf.inference.models import load_classifier, score


def run_members(run: Path, role: str = "test") -> list[tuple[str | None, Path]]:
    """(fold name, best checkpoint) of the models of a run folder that play `role`.

    "val": the models that score their own validation fold (out of fold); "test": the models whose
    mean probability scores new CT. For one model both are that model; for a `cv.folds` run both
    are the fold models, except with `cv.test=refit`, where the refit model (`refit/`) alone tests.
    """
    run = Path(run)
    results_file = run / "results.json"
    if not results_file.is_file():
        raise ConfigError(f"{run} holds no results.json: pass a finished python -m ovcf.train run folder (or a sweep folder)")
    results = json.loads(results_file.read_text())
    if results.get("task") != "classification":
        raise ConfigError(f"{run} is a {results.get('task')} run; evaluate takes task=classification runs")
    cv = results.get("cv")
    if cv is None:
        folders = [(None, run)]
    elif role == "test" and cv.get("test") == "refit":
        folders = [("refit", run / "refit")]
    else:
        folders = [(str(k), run / f"fold_{k}") for k in range(cv["folds"])]
    members = []
    for fold, folder in folders:
        res = json.loads((folder / "results.json").read_text()) if (folder / "results.json").is_file() else {}
        if not res.get("best_checkpoint"):
            raise ConfigError(f"{folder}/results.json names no best checkpoint: the run did not finish; train it again")
        members.append((fold, folder / res["best_checkpoint"]))
    return members


def _records(rows: list[dict], labels, probs, subset: str, fold) -> list[dict]:
    return [
        {"pseudonym": r["pseudonym"], "level": r["level"], "set": subset, "label": int(y), "probability": float(p), "fold": fold}
        for r, y, p in zip(rows, labels.tolist(), probs.tolist())
    ]


def masks_for(hp: dict, cohort: Path, predicted_masks: str | None) -> str | None:
    """The masks a run's ROIs of another cohort come from: the cohort's own, or, for a model trained on
    predicted masks, that cohort's predicted masks (which must be given)."""
    if hp.get("roi_source") != "predicted":
        return None
    if not predicted_masks:
        raise ConfigError(
            "this model was trained on ROIs from predicted masks: segment the cohort first "
            f"(python -m ovcf.segment ckpt=<segmenter.ckpt> data.cohort={cohort}) and pass predicted_masks=<that folder>"
        )
    return predicted_masks


def cohort_dataset(hp: dict, cohort: Path, masks: str | None, workers: int, progress: bool):
    """Every included row of a cohort as test rows, with a run's ingest checks, ROI and HU window, its ROIs
    cut from `masks` (a folder of predicted masks; None: the cohort's own); and its cache."""
    roi = RoiSpec.from_settings(hp)
    checks = IngestChecks.from_config(hp.get("ingest"))
    cache = ingest(check_cohort(Path(cohort)), hp["cache_dir"], roi, hp["key_file"], workers, progress, checks, masks)
    rows = [r for r in read_index(cache) if r["included"]]
    if not rows:
        raise ConfigError(f"cohort {cohort} has no included rows; see {cache / 'index.csv'}")
    return load_samples(cache, rows, roi.size, hp["hu_window"], mask_channel=hp.get("in_channels", 1) == 2), cache


def run_predictions(
    run: str | Path,
    cohort: str | Path | None = None,
    predicted_masks: str | None = None,
    device: str = "cpu",
    batch_size: int = 32,
    workers: int = 2,
    progress: bool = True,
) -> dict:
    """{"val": records, "test": records, "external": center or cohort, "cache": Path, "tasks": the
    test models, "dataset": the external samples}: validation records of every fold (out of fold) and
    the external records scored by the test model(s) (their mean; see `run_members`).

    A run on a one-center cohort, with no `cohort` given: "test" is empty and "external" and
    "dataset" are None (there is nothing external to score)."""
    val, test_probs, test_rows, test_labels, external, cache, tasks = [], [], None, None, None, None, []
    validators = run_members(Path(run), "val")
    testers = run_members(Path(run), "test")
    for fold, ckpt in dict.fromkeys(validators + testers):  # a model that plays both roles is loaded once
        task, hp = load_classifier(ckpt, device)
        if hp.get("cohort") is None or "data_dir" in hp:
            raise ConfigError(f"{ckpt} records no cohort folder (it predates this ovcf's data settings): train it again")
        hp = {k: v for k, v in hp.items() if k != "augment"} | {"progress": progress, "num_workers": 0}
        dm = CohortDataModule(**hp)
        dm.setup("fit")
        if (fold, ckpt) in validators:
            fold_name = fold if fold is not None else str(hp.get("fold", 0))
            ds = dm.datasets["val"]
            val += _records(ds.rows, ds.labels.int(), score(task, ds, batch_size), "val", fold_name)
        if (fold, ckpt) not in testers:
            continue
        tasks.append(task)
        if cohort is None and dm.centers["external"] is None:
            cache = dm.cache  # one center: validation records only
            continue
        if cohort is None:
            ds, external, cache = dm.datasets["test"], dm.centers["external"], dm.cache
        else:
            if test_rows is None:  # ingest the new cohort once
                masks = masks_for(hp, Path(cohort), predicted_masks)
                ext_ds, cache = cohort_dataset(hp, Path(cohort), masks, workers, progress)
            ds, external = ext_ds, str(cohort)
        probs = score(task, ds, batch_size)
        if test_rows is None:
            test_rows, test_labels, test_ds = ds.rows, ds.labels.int(), ds
        elif [r["row"] for r in ds.rows] != [r["row"] for r in test_rows]:
            raise ConfigError(f"the fold models of {run} see different external rows: were they trained on the same cohort?")
        test_probs.append(probs)
    if not test_probs:
        return {"val": val, "test": [], "external": None, "cache": cache, "tasks": tasks, "dataset": None}
    fold = "ensemble" if len(test_probs) > 1 else testers[0][0] or (val[0]["fold"] if val else "0")
    mean = torch.stack(test_probs).mean(0)
    test = _records(test_rows, test_labels, mean, "test", fold)
    if len(test_probs) > 1:
        for record, per_fold in zip(test, torch.stack(test_probs, 1).tolist()):
            record.update({f"fold_{k}": p for k, p in enumerate(per_fold)})
    return {"val": val, "test": test, "external": external, "cache": cache, "tasks": tasks, "dataset": test_ds}
