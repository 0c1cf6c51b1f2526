"""A trained system as one folder: the segmenter, the classifier model(s), the frozen threshold and
the preprocessing they were trained with.

A trained system is more than a checkpoint. `export_system` writes all of it into one versioned
folder, laid out like a MONAI bundle, and `load_system` reads it back with no Hydra run folder
around it (what `python -m ovcf.predict system=DIR` does):

    configs/metadata.json        MONAI-bundle-style metadata (versions, task, data formats) + models, threshold, metrics
    configs/inference.json       what predict needs: preprocessing, threshold, each model's file and init args
    models/segmenter.safetensors the segmenter's weights
    models/classifier*.safetensors one per classifier model (`classifier_fold_<k>.safetensors` for a CV run)
    docs/README.md               how to run it

Nothing in the folder is unpickled: weights are safetensors (raw tensors behind a JSON header) and
everything else is JSON, so a folder handed over by another site cannot run code when loaded. The
file names in `inference.json` must lie inside the folder.

The threshold is read from `<evaluation>/metrics.json` (what `python -m ovcf.evaluate` froze for this
run) when given; otherwise it is chosen exactly as evaluate does, from the run's validation predictions.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ovcf.data.ct import IngestChecks
from ovcf.data.ingest import cache_fingerprint, cache_folder, check_cohort
from ovcf.data.roi import RoiSpec
from ovcf.errors import ConfigError, OvcfError
from ovcf.eval.external import Scoring, evaluate_predictions
from ovcf.eval.report import PACKAGES, versions
from ovcf.inference.models import load_classifier, load_segmenter, weights_task
from ovcf.inference.runs import run_members, run_predictions
from ovcf.tasks import ClassificationTask, SegmentationTask
from ovcf.tasks.checkpoint import save_weights

SYSTEM_FORMAT = 2  # bumped when predict can no longer read older folders (2: safetensors, no pickles)
METADATA = Path("configs") / "metadata.json"
INFERENCE = Path("configs") / "inference.json"
SEGMENTER_FILE = Path("models") / "segmenter.safetensors"
PREPROCESSING_KEYS = ("roi_size", "roi_spacing", "roi_margin", "hu_window", "in_channels", "volume_spacing", "roi_source")


def _summary(metrics: dict | None) -> dict | None:
    """The point values of a `diagnostic_metrics` table (AUC with its CI, the rates, n)."""
    if not metrics:
        return None
    out = {"n": metrics.get("n"), "n_acute": metrics.get("n_acute")}
    for name in ("auc", "sensitivity", "specificity", "accuracy", "ppv", "npv"):
        if isinstance(metrics.get(name), dict):
            out[name] = {k: metrics[name][k] for k in ("value", "low", "high") if k in metrics[name]}
    return out


def _from_evaluation(evaluation: Path, run: Path) -> dict:
    """The threshold and metrics `python -m ovcf.evaluate` wrote for `run` into `<evaluation>/metrics.json`."""
    path = Path(evaluation).expanduser() / "metrics.json"
    if not path.is_file():
        raise ConfigError(f"evaluation={evaluation}: no metrics.json there; pass the folder python -m ovcf.evaluate wrote")
    report = json.loads(path.read_text())
    for label, entry in report.get("models", {}).items():
        if entry.get("run") and Path(entry["run"]).expanduser().resolve() == run.resolve():
            return {
                "label": label,
                "threshold": entry["threshold"],
                "rule": report.get("threshold_rule", entry["threshold"].get("rule")),
                "val": entry.get("val"),
                "test": entry.get("test"),
                "external": report.get("external"),
                "source": str(path),
            }
    runs = ", ".join(str(e.get("run")) for e in report.get("models", {}).values())
    raise ConfigError(f"{path} holds no model of classifier={run} (it scored: {runs}); evaluate that run first")


def _from_validation(run: Path, rule: str, sensitivity: float | None, device: str, progress: bool) -> dict:
    """The threshold evaluate would freeze: its own functions on the run's out-of-fold validation predictions."""
    preds = run_predictions(run, device=device, progress=progress)
    scored = evaluate_predictions(preds["val"], preds["test"], Scoring(rule, sensitivity))
    return {
        "label": None,
        "threshold": scored["threshold"],
        "rule": rule if rule != "sensitivity" else f"sensitivity >= {sensitivity}",
        "val": scored["val"],
        "test": scored["test"],
        "external": preds["external"],
        "source": "validation predictions of the run (as python -m ovcf.evaluate)",
    }


def _data_hash(hp: dict) -> str | None:
    """The ingest cache's fingerprint of the cohort the classifier was trained on, if that cache is still there."""
    try:
        masks = Path(hp["predicted_masks"]).expanduser().resolve() if hp.get("roi_source") == "predicted" else None
        roi = RoiSpec.from_settings(hp, hp.get("volume_spacing"))
        return cache_fingerprint(cache_folder(check_cohort(Path(hp["cohort"])), Path(hp["cache_dir"]), roi, masks))
    except (OvcfError, OSError, KeyError, TypeError, ValueError):
        return None


def _preprocessing(members_hp: list[dict], seg_settings: dict) -> dict:
    """ROI, HU window, channels and ingest checks, identical for every classifier model (else an error)."""
    first = {k: members_hp[0].get(k) for k in PREPROCESSING_KEYS}
    for hp in members_hp[1:]:
        other = {k: hp.get(k) for k in PREPROCESSING_KEYS}
        if other != first:
            raise ConfigError(f"the fold models were trained with different preprocessing ({first} vs {other}); retrain the run")
    checks = IngestChecks.from_config(members_hp[0].get("ingest"))  # validates and fills the defaults
    return {
        "roi_size": int(first["roi_size"]),
        "roi_spacing": float(first["roi_spacing"]),
        "roi_margin": None if first.get("roi_margin") is None else float(first["roi_margin"]),
        "hu_window": [float(v) for v in first["hu_window"]],
        "in_channels": int(first["in_channels"]),
        "roi_source": first["roi_source"],
        "volume_spacing": float(seg_settings["spacing"]),
        "segmenter_hu_window": [float(v) for v in seg_settings["hu_window"]],
        "ingest": asdict(checks),
    }


def export_system(
    classifier_run: Path,
    segmenter_ckpt: Path,
    out: Path,
    evaluation: Path | None = None,
    *,
    rule: str = "youden",
    sensitivity: float | None = None,
    version: str = "1.0.0",
    device: str = "cpu",
    progress: bool = False,
) -> Path:
    """Writes the system (segmenter, classifier model(s), frozen threshold, preprocessing) into `out`.

    Args:
        classifier_run: a finished `python -m ovcf.train` classification run (one model, `fold_<k>/` models, or
            a `cv.test=refit` run, whose refit model is the one exported).
        segmenter_ckpt: the chosen `task=segmentation` checkpoint.
        out: the folder to write; replaced when it exists (written beside it first, so a crash leaves the old one).
        evaluation: `python -m ovcf.evaluate`'s output folder holding this run: its frozen threshold and metrics
            are used. None: the threshold is chosen from the run's validation predictions by `rule`.
        rule, sensitivity: the threshold rule without `evaluation` (youden, sensitivity with its target, fixed).
        version: the system's version in `metadata.json`.

    Returns:
        `out`.
    """
    run, out = Path(classifier_run).expanduser(), Path(out).expanduser()
    members = run_members(run)
    results = json.loads((run / "results.json").read_text())
    tasks, hps = zip(*(load_classifier(ckpt, "cpu") for _, ckpt in members))
    seg_task, seg_settings = load_segmenter(segmenter_ckpt, "cpu")
    pre = _preprocessing(hps, seg_settings)
    chosen = _from_evaluation(Path(evaluation), run) if evaluation else _from_validation(run, rule, sensitivity, device, progress)

    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    save_weights(seg_task, tmp / SEGMENTER_FILE)
    classifiers = []
    for (fold, _), task in zip(members, tasks):
        name = "classifier.safetensors" if fold in (None, "refit") else f"classifier_fold_{fold}.safetensors"
        save_weights(task, tmp / "models" / name)
        classifiers.append({"file": f"models/{name}", "fold": fold, "hyper_parameters": _init_args(task)})
    threshold = {**chosen["threshold"], "value": float(chosen["threshold"]["value"])}
    inference = {
        "format": SYSTEM_FORMAT,
        "version": version,
        "segmenter": {
            "file": SEGMENTER_FILE.as_posix(),
            "model": seg_task.hparams.model_name,
            "hyper_parameters": _init_args(seg_task),
            "settings": {"hu_window": list(seg_settings["hu_window"]), "spacing": seg_settings["spacing"]},
        },
        "classifier": {"model": results.get("model"), "members": classifiers, "combine": "mean probability"},
        "threshold": threshold,
        "preprocessing": pre,
    }
    meta = _metadata(version, results, seg_task, pre, threshold, chosen, hps[0], len(members))
    (tmp / "configs").mkdir(parents=True, exist_ok=True)
    (tmp / INFERENCE).write_text(json.dumps(inference, indent=2))
    (tmp / METADATA).write_text(json.dumps(meta, indent=2))
    (tmp / "docs").mkdir(exist_ok=True)
    (tmp / "docs" / "README.md").write_text(_readme(meta, inference))
    if out.exists():
        shutil.rmtree(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp.rename(out)
    return out


def _centers_words(centers: dict) -> str:
    if centers.get("external") is None:
        return f"one center ({centers.get('dev')}): internal validation only, no external center"
    return f"development center {centers.get('dev')}, external center {centers.get('external')}"


def _roi_words(pre: dict) -> str:
    if pre.get("roi_margin") is None:
        return f"{pre['roi_spacing']:g} mm"
    return f"the body's extent plus {pre['roi_margin']:g} mm on each side"


def _metadata(version, results, seg_task, pre, threshold, chosen, hp, n_members) -> dict:
    """MONAI bundle metadata (its schema's keys) plus what ovcf adds: models, threshold, metrics, data hash."""
    found = versions((*PACKAGES, "highdicom", "nibabel"))
    size = pre["roi_size"]
    return {
        "schema": "https://github.com/Project-MONAI/MONAI-extra-test-data/releases/download/0.8.1/meta_schema_20220324.json",
        "version": version,
        "changelog": {version: "exported by python -m ovcf.export"},
        "monai_version": found.get("monai"),
        "pytorch_version": torch.__version__.split("+")[0],
        "numpy_version": found.get("numpy"),
        "optional_packages_version": {
            p: found.get(p) for p in ("lightning", "timm", "torchio", "pydicom", "highdicom", "nibabel", "ovcf")
        },
        "required_packages_version": {"ovcf": found.get("ovcf")},
        "name": "ovcf acute vs chronic OVCF",
        "task": "Acute vs chronic osteoporotic vertebral compression fracture from CT (segmentation, then classification)",
        "description": (
            f"Vertebral bodies are segmented per level by a {seg_task.hparams.model_name} on the CT at "
            f"{pre['volume_spacing']:g} mm; each fractured level's {size}-voxel ROI of {_roi_words(pre)} is "
            f"classified by {results.get('model')} ({n_members} model(s), probabilities averaged) and called acute at "
            f"probability >= {threshold['value']:.4f} ({chosen['rule']}, frozen on validation)."
        ),
        "authors": "ovcf",
        "copyright": "Copyright (c) the ovcf authors",
        "data_source": f"cohort {'synthetic (ovcf.synth)' if hp.get('synthetic') else hp.get('cohort')}; "
        + _centers_words(results.get("centers") or {}),
        "data_type": "dicom",
        "image_classes": "CT in Hounsfield units, windowed to [0, 1]",
        "label_classes": "0 chronic, 1 acute (bone-marrow oedema on MRI)",
        "pred_classes": "probability of acute",
        "intended_use": "research only; not a medical device",
        "network_data_format": {
            "inputs": {
                "image": {
                    "type": "image",
                    "format": "hounsfield",
                    "modality": "CT",
                    "num_channels": pre["in_channels"],
                    "spatial_shape": [size, size, size],
                    "dtype": "float32",
                    "value_range": [0, 1],
                    "is_patch_data": True,
                    "channel_def": {"0": "CT", **({"1": "vertebral body mask"} if pre["in_channels"] == 2 else {})},
                }
            },
            "outputs": {
                "pred": {
                    "type": "probabilities",
                    "format": "classification",
                    "num_channels": 1,
                    "spatial_shape": [1],
                    "dtype": "float32",
                    "value_range": [0, 1],
                    "is_patch_data": False,
                    "channel_def": {"0": "acute"},
                }
            },
        },
        "models": {
            "segmenter": {"model": seg_task.hparams.model_name, "file": SEGMENTER_FILE.as_posix()},
            "classifier": {"model": results.get("model"), "members": n_members, "run_seed": results.get("seed")},
        },
        "threshold": threshold["value"],
        "threshold_rule": chosen["rule"],
        "threshold_source": chosen["source"],
        "validation_metrics": _summary(chosen["val"]),
        "external_metrics": _summary(chosen["test"]),
        "external": chosen["external"],
        "data_hash": results.get("data_hash") or _data_hash(hp),
        "ovcf_format": SYSTEM_FORMAT,
        "python_version": found["python"],
    }


def _readme(meta: dict, inference: dict) -> str:
    return (
        f"# {meta['name']} {meta['version']}\n\n{meta['description']}\n\n"
        "Run it on a patient's DICOM export (or a folder of many patients, or a NIfTI CT):\n\n"
        "```bash\npython -m ovcf.predict system=<this folder> input=DICOM_DIR output=OUT_DIR\n```\n\n"
        f"Threshold {inference['threshold']['value']:.4f} ({meta['threshold_rule']}). {meta['intended_use']}.\n"
    )


@dataclass
class System:
    """An exported system, loaded: models, frozen threshold and the preprocessing they were trained with."""

    folder: Path
    meta: dict
    segmenter: object
    seg_settings: dict
    classifiers: list
    threshold: float
    pre: dict
    checks: IngestChecks


def latest_system(log_dir: Path) -> Path:
    """The newest `<log_dir>/study/*/system` folder (by modification time)."""
    found = [p for p in Path(log_dir).expanduser().glob("study/*/system") if (p / INFERENCE).is_file()]
    if not found:
        raise ConfigError(
            f"no trained system under {Path(log_dir) / 'study'}/*/system: pass system=DIR (a folder written by "
            "python -m ovcf.export) or run the study first (python -m ovcf.study)"
        )
    return max(found, key=lambda p: p.stat().st_mtime)


def load_system(folder: Path, device: str = "cpu") -> System:
    """Loads an `ovcf.export` folder; needs nothing else (no run folder, no Hydra config) and unpickles nothing."""
    folder = Path(folder).expanduser()
    if not (folder / INFERENCE).is_file():
        raise ConfigError(f"system={folder}: no {INFERENCE} there; pass a folder written by python -m ovcf.export")
    inference = _read_json(folder / INFERENCE)
    found = inference.get("format", 0)
    if not isinstance(found, int) or found > SYSTEM_FORMAT:
        raise ConfigError(f"system={folder} has format {found!r}, newer than this ovcf reads ({SYSTEM_FORMAT}); update ovcf")
    if found < SYSTEM_FORMAT:
        raise ConfigError(
            f"system={folder} has format {found}: its models are pickled checkpoints, which this ovcf no longer "
            "loads (unpickling can run code); export it again with python -m ovcf.export from its runs"
        )
    try:
        seg, members, pre = inference["segmenter"], inference["classifier"]["members"], inference["preprocessing"]
        threshold = float(inference["threshold"]["value"])
        window, spacing = seg["settings"]["hu_window"], seg["settings"]["spacing"]
        settings = {"hu_window": tuple(float(v) for v in window), "spacing": float(spacing)}
        jobs = [(SegmentationTask, seg)] + [(ClassificationTask, m) for m in members]
        files = [(cls, _inside(folder, entry["file"]), entry["hyper_parameters"]) for cls, entry in jobs]
    except (KeyError, TypeError, ValueError) as exc:
        raise ConfigError(
            f"{folder / INFERENCE} lacks or garbles {exc}; export the system again with python -m ovcf.export"
        ) from None
    segmenter, *classifiers = [weights_task(cls, hp, path, device) for cls, path, hp in files]
    return System(
        folder,
        _read_json(folder / METADATA) if (folder / METADATA).is_file() else {},
        segmenter,
        settings,
        classifiers,
        threshold,
        pre,
        IngestChecks.from_config(pre.get("ingest")),
    )


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{path} is not valid JSON ({type(exc).__name__}); export the system again") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path} is not a JSON object; export the system again")
    return data


def _inside(folder: Path, name) -> Path:
    """`folder / name`, refused unless it stays inside `folder` (no absolute path, no '..', no link out)."""
    rel = Path(str(name))
    path = folder / rel
    if rel.is_absolute() or ".." in rel.parts or not path.resolve().is_relative_to(folder.resolve()):
        raise ConfigError(
            f"{folder / INFERENCE}: the model file {str(name)!r} lies outside the system folder; a system may only "
            "name files inside it (no absolute path, no '..'): export it again with python -m ovcf.export"
        )
    if not path.is_file():
        raise ConfigError(f"{path} not found: the system folder is incomplete; export it again with python -m ovcf.export")
    return path


def _init_args(task) -> dict:
    """The task's init args as JSON values (they are primitives by design; a non-JSON value is an error)."""
    hparams = dict(task.hparams)
    json.dumps(hparams)  # raises TypeError on anything JSON cannot hold
    return hparams
