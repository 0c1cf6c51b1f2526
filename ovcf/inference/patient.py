"""One new patient's CT through the exported system: segment, measure, classify, explain.

Each patient's CT series is chosen and validated by the one CT path (`ovcf.data.ct`), as cohort
ingest does: a series ingest would reject is refused with its reason. Its vertebral bodies are
segmented by the system's segmenter, the requested levels are checked as ingest checks a cohort
row (field of view, cement or metal, noise) and cropped as in training, and each is classified by
the system's model(s) at the frozen threshold, with a Grad-CAM overlay. Everything written is named
by the patient's pseudonym only.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import torch

from ovcf.atomic import write_csv, write_json
from ovcf.contract import LEVEL_IDS, LEVEL_ORDER, SIGN_NAMES, SIGNS
from ovcf.data.ct import Case, SpineQc, check_level, load_case, slice_problem
from ovcf.data.datamodule import VertebraDataset
from ovcf.data.heights import level_heights
from ovcf.data.pseudonym import pseudonym
from ovcf.data.quality import level_voxels
from ovcf.data.roi import RoiSpec
from ovcf.data.volume import Volume
from ovcf.errors import CohortError, ConfigError, OvcfError
from ovcf.eval.gradcam import ensemble_gradcam, overlay_figure
from ovcf.inference.dicom import check_seg_mode, check_seg_type, write_dicom
from ovcf.inference.models import score, segment_ct, sign_scores
from ovcf.inference.system import System
from ovcf.parallel import track

log = logging.getLogger(__name__)


def choose_levels(levels, heights: dict[str, dict]) -> list[str]:
    """The levels to classify: the named ones, `auto` (Genant grade >= 1 on the mask), or `all` (every body found)."""
    if isinstance(levels, str) and levels in ("auto", "all"):
        picked = [lv for lv, h in heights.items() if levels == "all" or (h["genant_grade"] or 0) >= 1]
    else:
        picked = [levels] if isinstance(levels, str) else [str(v) for v in levels]
        unknown = [lv for lv in picked if lv not in LEVEL_IDS]
        if unknown:
            raise ConfigError(f"levels={levels}: unknown level(s) {', '.join(unknown)}; use C1..L6 or T13, auto, or all")
    return sorted(dict.fromkeys(picked), key=LEVEL_ORDER.index)


def _level(volume: Volume, by_id: dict, level: str, system: System, spine: SpineQc) -> tuple[dict, tuple | None]:
    """The protocol checks of one level (as ingest checks a cohort row) and, when nothing excludes it, its ROI."""
    check = check_level(volume, by_id, level, system.checks.quality, spine)
    if check.centre is None:
        return {"status": "not_in_fov", "note": check.notes[0]}, None
    entry = {"status": "excluded" if check.reasons else "classified", "excluded": check.reasons, "flags": check.flags}
    roi = None if check.reasons else check.cut(volume, RoiSpec.from_settings(system.pre))
    return entry | {"qc": check.qc}, roi


def classify(
    system: System, rois: dict[str, tuple], name: str, clinical: dict
) -> tuple[dict[str, float], np.ndarray, object, dict[str, dict[str, float]]]:
    """Mean acute probability of the system's models per level, the Grad-CAM maps, the dataset, and the mean
    probability of each sign per level (empty when no model has sign heads)."""
    levels = list(rois)
    rows = [{"pseudonym": name, "level": lv, "label": "chronic", **clinical} for lv in levels]
    ds = VertebraDataset(
        rows,
        np.stack([rois[lv][0] for lv in levels]).astype(np.float32),
        np.stack([rois[lv][1] for lv in levels]),
        system.pre["hu_window"],
        mask_channel=int(system.pre["in_channels"]) == 2,
    )
    probs = torch.stack([score(task, ds) for task in system.classifiers]).mean(0).tolist()
    device = next(system.classifiers[0].parameters()).device
    images = torch.stack([ds[i]["image"] for i in range(len(ds))]).to(device)
    cams = ensemble_gradcam(system.classifiers, images, ds.clinical.to(device))
    signs = sign_scores(system.classifiers, ds)
    per_level = {} if signs is None else {lv: dict(zip(SIGNS, row)) for lv, row in zip(levels, signs.tolist())}
    return dict(zip(levels, probs)), cams, ds, per_level


def predict_patient(
    case: Case, name: str, system: System, out: Path, levels="auto", clinical: dict | None = None, **options
) -> dict:
    """Segments, measures and classifies one patient `name` (its pseudonym); writes `<out>/<name>/` and returns its report.

    Options: `nifti` (the predicted mask as `mask.nii.gz`), `dicom_seg` (as a DICOM SEG on the source series),
    `dicom_sr` (the levels' results as a DICOM SR referencing that SEG, which it writes too), `seg_mode`
    (`research`, the default, or `pacs`: see `ovcf.inference.dicom.write_dicom`) and `seg_type` (`labelmap`,
    the default, or `binary`).
    """
    start = time.perf_counter()
    choice = load_case(case, system.checks, name)
    raw, series, notes = choice.volume, choice.series, list(choice.notes)
    volume = raw.canonical()
    problem = slice_problem(volume, system.checks.quality)
    if problem:  # ingest excludes every row of such a CT
        raise CohortError(f"{name}: refused (image_quality): {problem}")
    segmentation = segment_ct(system.segmenter, system.seg_settings, volume)
    labels = segmentation.on_grid(volume)
    heights = level_heights(labels, volume.spacing)
    chosen = choose_levels(levels, heights)
    by_id = level_voxels(labels)
    spine = SpineQc(volume, by_id, system.checks.quality)
    checked = {lv: _level(volume, by_id, lv, system, spine) for lv in chosen}
    ready = {lv: roi for lv, (_, roi) in checked.items() if roi is not None}
    folder = out / name
    folder.mkdir(parents=True, exist_ok=True)
    probs, cams, signs = {}, None, {}
    if ready:
        features = {"age": float("nan"), "sex": "", "dxa_t_score": float("nan"), **(clinical or {})}
        probs, cams, ds, signs = classify(system, ready, name, features)
    entries = []
    for lv in chosen:
        entry = {"level": lv, "in_mask": lv in heights, "heights": heights.get(lv), **checked[lv][0]}
        if lv in probs:
            p = float(probs[lv])
            i = list(ready).index(lv)
            png = folder / f"{name}_{lv}_gradcam.png"
            caption = f"{name} {lv}\np={p:.2f}"
            overlay_figure(
                [{"image": ds[i]["image"][0].numpy(), "cam": cams[i], "caption": caption}], png, f"{lv}: {_decision(p, system)}"
            )
            entry |= {"probability": p, "decision": _decision(p, system), "threshold": system.threshold, "gradcam": png.name}
            if lv in signs:
                entry["signs"] = {k: round(v, 4) for k, v in signs[lv].items()}
        entries.append(entry)
    files = {}
    if options.get("nifti"):
        nib.save(nib.Nifti1Image(labels, volume.affine), folder / "mask.nii.gz")
        files["mask"] = "mask.nii.gz"
    if _seg_mode(options):
        labels_raw = segmentation.on_grid(raw) if heights else None
        files |= _dicom_outputs(folder, series, labels_raw, name, system, _sr_levels(entries, heights), notes, options)
    assignment = segmentation.assignment
    report = {
        "pseudonym": name,
        "system": {
            "version": system.meta.get("version"),
            "threshold": system.threshold,
            "rule": system.meta.get("threshold_rule"),
        },
        "series": None if series is None else series.name,
        "notes": [case.scrub(n, name) for n in notes],
        "ct": {"shape": list(volume.array.shape), "spacing_mm": [round(float(s), 3) for s in volume.spacing]},
        "segmentation": {
            "levels": list(assignment.levels),
            "anchored": bool(assignment.anchored),
            "anchor": assignment.anchor,
            "heights": heights,
        },
        "levels_requested": levels if isinstance(levels, str) else list(levels),
        "levels": entries,
        "files": files,
        "seg_mode": _seg_mode(options),
        "seconds": round(time.perf_counter() - start, 2),
    }
    write_json(folder / "report.json", report, indent=2)
    return report


def _sr_levels(entries: list[dict], heights: dict[str, dict]) -> list[dict]:
    """Every body found, as the SR reports it: a requested level's report entry, any other body's heights and grade
    (so the SR holds the whole Genant reading, and a patient with no fractured level still has one)."""
    chosen = {e["level"]: e for e in entries}
    return [chosen.get(level) or {"level": level, "heights": h} for level, h in heights.items()]


def _dicom_outputs(folder: Path, series, labels, name: str, system: System, levels: list, notes: list, options: dict) -> dict:
    """`seg.dcm` and, with `dicom_sr`, `sr.dcm` of `levels` (their report.json `files` entries); when they cannot be
    written, a note in `notes` says why and the prediction stands."""
    what = "dicom_seg, dicom_sr" if options.get("dicom_sr") else "dicom_seg"
    if series is None:
        notes.append(f"{what}: skipped, the input is NIfTI (DICOM outputs need the source DICOM series)")
        return {}
    if labels is None:
        notes.append(f"{what}: skipped, the segmenter found no vertebral body")
        return {}
    kind, sr_levels = options.get("seg_type", "labelmap"), levels if options.get("dicom_sr") else None
    try:
        return write_dicom(folder, series, labels, name, system, _seg_mode(options), kind, sr_levels)
    except CohortError as exc:
        notes.append(f"{what}: skipped, {exc}")
        return {}


def _seg_mode(options: dict) -> str | None:
    """The DICOM outputs' mode among predict's `options` (None: neither SEG nor SR asked for), named in report and
    summary. The SR references the SEG's segments, so `dicom_sr` writes the SEG too."""
    if not (options.get("dicom_seg") or options.get("dicom_sr")):
        return None
    check_seg_type(options.get("seg_type", "labelmap"))
    return check_seg_mode(options.get("seg_mode", "research"))


def _decision(probability: float, system: System) -> str:
    """Acute when the probability reaches the frozen threshold (as `ovcf.eval.metrics.confusion` calls it)."""
    return "acute" if probability >= system.threshold else "chronic"


SUMMARY = (
    "pseudonym",
    "level",
    "status",
    "probability",
    "decision",
    "height_loss",
    "genant_grade",
    "excluded",
    "flags",
    "seconds",
    *(f"p_{name}" for name in SIGNS),
)


def _summary_rows(report: dict) -> list[dict]:
    rows = []
    for e in report["levels"]:
        h = e.get("heights") or {}
        rows.append(
            {
                "pseudonym": report["pseudonym"],
                "level": e["level"],
                "status": e["status"],
                "probability": e.get("probability", ""),
                "decision": e.get("decision", ""),
                "height_loss": h.get("height_loss", ""),
                "genant_grade": h.get("genant_grade", ""),
                "excluded": ";".join(e.get("excluded", [])),
                "flags": ";".join(e.get("flags", [])),
                "seconds": report["seconds"],
                **{f"p_{name}": p for name, p in (e.get("signs") or {}).items()},
            }
        )
    return rows


def call_text(entry: dict) -> str:
    """One level as the summary prints it: `L1 acute (p=0.91; fracture line 0.82, oedema-like attenuation 0.71,
    impaction band 0.64)`: the three most likely signs, when the system reports signs (report.json has all)."""
    if "decision" not in entry:
        return f"{entry['level']} {entry['status']}"
    signs = sorted((entry.get("signs") or {}).items(), key=lambda kv: -kv[1])[:3]
    listed = ("; " + ", ".join(f"{SIGN_NAMES[k]} {v:.2f}" for k, v in signs)) if signs else ""
    return f"{entry['level']} {entry['decision']} (p={entry['probability']:.2f}{listed})"


def predict_cases(
    cases: list[Case],
    key: bytes,
    system: System,
    out: Path,
    levels="auto",
    clinical: dict | None = None,
    progress: bool = True,
    **options,
) -> dict:
    """`predict_patient` for every case, each under its pseudonym; one patient's refusal (printed in one
    line) does not stop the others. Writes `<out>/summary.json` and `summary.csv`; returns the summary."""
    seg_mode = _seg_mode(options)  # a wrong mode fails before any work
    named = sorted(((pseudonym(c.patient_id, key), c) for c in cases), key=lambda nc: nc[0])
    done, refused, rows = [], {}, []
    log.info(f"System {system.meta.get('version', '?')} ({system.folder}); {len(cases)} patient(s)")
    for name, case in track(named, len(named), "Predicting", enabled=progress and len(named) > 1):
        try:
            report = predict_patient(case, name, system, out, levels, clinical, **options)
        except OvcfError as exc:
            message = case.scrub(str(exc), name)
            refused[name] = message
            if len(named) > 1:  # one patient's refusal is the run's error; among many, the others go on
                log.error(message)
            continue
        done.append(name)
        rows += _summary_rows(report)
        calls = ", ".join(call_text(e) for e in report["levels"])
        dicom = [report["files"][k] for k in ("dicom_seg", "dicom_sr") if k in report["files"]]
        wrote = f"; {' and '.join(dicom)} written" if dicom else ""
        log.info(f"{name}: {calls or 'no fractured level'}{wrote} - {report['seconds']:.1f} s")
    summary = {
        "system": str(system.folder),
        "threshold": system.threshold,
        "seg_mode": seg_mode,
        "patients": done,
        "refused": refused,
    }
    write_json(out / "summary.json", summary, indent=2)
    write_csv(out / "summary.csv", rows, SUMMARY)
    if not done:
        if len(refused) == 1:
            raise CohortError(next(iter(refused.values())))
        raise CohortError(f"all {len(refused)} patients were refused (see above); nothing predicted")
    log.info(f"{len(done)} of {len(cases)} patient(s) predicted" + (f", {len(refused)} refused" if refused else "") + f": {out}")
    return summary
