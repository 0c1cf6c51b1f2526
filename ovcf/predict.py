"""`python -m ovcf.predict input=DICOM_DIR output=OUT_DIR`: the exported system applied to new patients' CT.

`input` is one patient's DICOM export, a whole export folder holding many patients (grouped by
PatientID), or a NIfTI CT. Each patient's CT series is chosen and validated exactly as cohort
ingest does (a series ingest would reject is refused with its reason; with many patients the others
still run), its vertebral bodies are segmented by the system's segmenter, and every fractured level
(named by `levels=[L1,T12]`; `levels=auto`: every body whose height loss reaches Genant grade 1;
`levels=all`: every body found) is cropped as in training and classified. Written per patient, under
its pseudonym only (`<output>/<pseudonym>/`): `report.json` (per level: acute probability, the
decision at the system's frozen threshold, heights and their ratios, protocol flags), a Grad-CAM
overlay per level, and optionally `mask.nii.gz` (`nifti=true`) and `seg.dcm` (`dicom_seg=true`, a
DICOM SEG on the source CT series). `<output>/summary.csv` and `summary.json` list every patient.
"""

from __future__ import annotations

import csv
import json
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import hydra
import nibabel as nib
import numpy as np
import torch
from omegaconf import DictConfig, ListConfig, OmegaConf

from ovcf.cli import check_overrides, config_dir, guarded
from ovcf.contract import LEVEL_IDS, LEVEL_ORDER
from ovcf.errors import CohortError, ConfigError, OvcfError
from ovcf.export import INFERENCE, METADATA, SYSTEM_FORMAT

NIFTI = (".nii", ".nii.gz")


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
    checks: object  # ovcf.data.ingest.IngestChecks


@dataclass
class Case:
    """One patient of the input: its pseudonym and either its DICOM series or a NIfTI file."""

    name: str
    series: list | None = None
    nifti: Path | None = None
    patient_id: str = ""


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
    """Loads an `ovcf.export` folder; needs nothing else (no run folder, no Hydra config)."""
    from ovcf.data.ingest import IngestChecks
    from ovcf.eval.predictions import load_classifier
    from ovcf.segment import load_segmenter

    folder = Path(folder).expanduser()
    if not (folder / INFERENCE).is_file():
        raise ConfigError(f"system={folder}: no {INFERENCE} there; pass a folder written by python -m ovcf.export")
    inference = json.loads((folder / INFERENCE).read_text())
    if int(inference.get("format", 0)) > SYSTEM_FORMAT:
        raise ConfigError(
            f"system={folder} has format {inference['format']}, newer than this ovcf reads ({SYSTEM_FORMAT}); update ovcf"
        )
    segmenter, settings = load_segmenter(folder / inference["segmenter"]["file"], device)
    classifiers = [load_classifier(folder / m["file"], device)[0] for m in inference["classifier"]["members"]]
    pre = inference["preprocessing"]
    return System(
        folder,
        json.loads((folder / METADATA).read_text()) if (folder / METADATA).is_file() else {},
        segmenter,
        settings,
        classifiers,
        float(inference["threshold"]["value"]),
        pre,
        IngestChecks.from_config(pre.get("ingest")),
    )


def _headers(paths: list[str]) -> list:
    from ovcf.data.dicom import read_header

    return [h for p in paths for h in read_header(p)[0]]


def _stem(path: Path) -> str:
    return path.name.removesuffix(".gz").removesuffix(".nii")


def find_cases(path: Path, key: bytes, workers: int = 1, progress: bool = True) -> list[Case]:
    """The patients of `input`: DICOM slices grouped by PatientID, or NIfTI CT files, named by pseudonym."""
    from ovcf.data.dicom import list_files
    from ovcf.data.pseudonym import pseudonym
    from ovcf.data.series import group_series
    from ovcf.parallel import pool_map

    path = Path(path).expanduser()
    if not path.exists():
        raise ConfigError(
            f"input={path}: no such file or folder (give a DICOM folder, an export of many patients, or a NIfTI CT)"
        )
    if path.is_file():
        if not path.name.endswith(NIFTI):
            raise ConfigError(f"input={path}: give a NIfTI CT (.nii, .nii.gz) or a folder of DICOM files")
        return [Case(pseudonym(_stem(path), key), nifti=path)]
    files = list_files(path)
    chunks = [files[i : i + 64] for i in range(0, len(files), 64)]
    headers = [h for part in pool_map(_headers, chunks, workers, "Reading DICOM headers", progress) for h in part]
    by_patient: dict[str, list] = {}
    for s in group_series(headers):
        by_patient.setdefault(s.patient_id, []).append(s)
    cases = [Case(pseudonym(pid, key), series, patient_id=pid) for pid, series in sorted(by_patient.items())]
    cases += [Case(pseudonym(_stem(Path(f)), key), nifti=Path(f)) for f in files if f.endswith(NIFTI)]
    if not cases:
        raise ConfigError(f"input={path}: no DICOM images and no NIfTI CT among its {len(files)} files")
    return sorted(cases, key=lambda c: c.name)


def _scrub(text: str, case: Case) -> str:
    """A message without the input's file paths or the original patient ID (they can identify the patient)."""
    for s in case.series or []:
        for h in s.slices:
            text = text.replace(h.path, "<file>")
    return text.replace(case.patient_id, case.name) if case.patient_id else text


def load_ct(case: Case, checks) -> tuple:
    """(volume as read, its Series or None, notes): the CT ingest would choose, or `CohortError` with ingest's reason."""
    from ovcf.data.series import SeriesError, ct_candidates, load_series
    from ovcf.data.volume import load_nifti

    if case.nifti is not None:
        try:
            volume = load_nifti(case.nifti)
        except Exception as exc:  # noqa: BLE001 - nibabel raises many types for broken files
            raise CohortError(f"{case.name}: the NIfTI CT cannot be read ({type(exc).__name__}); ingest would reject it") from exc
        if volume.array.ndim != 3:
            raise CohortError(f"{case.name}: the NIfTI CT has {volume.array.ndim} dimensions, not 3")
        return volume, None, []
    candidates = ct_candidates(case.series)
    if not candidates:
        found = ", ".join(s.name for s in case.series)
        raise CohortError(f"{case.name}: refused (no_ct): no axial CT series in the export ({found})")
    problems = []
    for s in candidates:
        try:
            volume = load_series(s, checks.series)
        except SeriesError as exc:
            problems.append(f"{exc.code}: {_scrub(str(exc), case)}")
            continue
        notes = list(s.notes) + (["series_fallback: preferred series rejected: " + " | ".join(problems)] if problems else [])
        return volume, s, notes
    raise CohortError(f"{case.name}: refused, no CT series passes ingest's validation: " + " | ".join(problems))


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


def _roi(volume, by_id: dict, level: str, system: System) -> dict:
    """The ROI (HU, rounded as the ingest cache stores it), body mask and protocol checks of one level, as ingest cuts them."""
    from ovcf.data.ingest import RoiSpec, check_box, cut_roi
    from ovcf.data.quality import implant_ml, locate_level, noise_hu

    voxels, centre = locate_level(by_id, volume, level)
    if centre is None:
        return {"status": "not_in_fov", "note": f"level {level} is outside the CT's field of view"}
    flags = [] if voxels is not None else ["level_mask_missing"]  # then centred on the estimate, as ingest does
    box, q, pre = check_box(voxels, centre, volume), system.checks.quality, system.pre
    dense, noise = implant_ml(volume, box, q), noise_hu(volume, box, q)
    excluded = (["implant"] if dense >= q.implant_min_ml else []) + (["image_quality"] if noise > q.max_noise_hu else [])
    image, mask, spacing = cut_roi(volume, voxels, centre, RoiSpec.from_settings(pre))
    return {
        "status": "excluded" if excluded else "classified",
        "excluded": excluded,
        "flags": flags,
        "qc": {"implant_ml": round(dense, 3), "noise_hu": round(noise, 1), "roi_mm": round(spacing, 4)},
        "image": image.astype(np.float32),
        "mask": mask,
    }


def classify(system: System, rois: dict[str, dict], name: str, clinical: dict) -> tuple[dict[str, float], np.ndarray, object]:
    """Mean acute probability of the system's models per level, the Grad-CAM maps and the dataset."""
    from ovcf.data.datamodule import VertebraDataset
    from ovcf.eval.gradcam import ensemble_gradcam
    from ovcf.eval.predictions import predict as predict_probs

    levels = list(rois)
    rows = [{"pseudonym": name, "level": lv, "label": "chronic", **clinical} for lv in levels]
    ds = VertebraDataset(
        rows,
        np.stack([rois[lv]["image"] for lv in levels]),
        np.stack([rois[lv]["mask"] for lv in levels]),
        system.pre["hu_window"],
        mask_channel=int(system.pre["in_channels"]) == 2,
    )
    probs = torch.stack([predict_probs(task, ds) for task in system.classifiers]).mean(0).tolist()
    device = next(system.classifiers[0].parameters()).device
    images = torch.stack([ds[i]["image"] for i in range(len(ds))]).to(device)
    cams = ensemble_gradcam(system.classifiers, images, ds.clinical.to(device))
    return dict(zip(levels, probs)), cams, ds


def predict_patient(case: Case, system: System, out: Path, levels="auto", clinical: dict | None = None, **options) -> dict:
    """Segments, measures and classifies one patient; writes `<out>/<pseudonym>/` and returns its report."""
    from ovcf.data.heights import level_heights
    from ovcf.data.quality import level_voxels
    from ovcf.data.volume import resample_volume
    from ovcf.eval.gradcam import overlay_figure
    from ovcf.segment import predict as segment_volume
    from ovcf.segment import to_ct_grid

    start = time.perf_counter()
    raw, series, notes = load_ct(case, system.checks)
    volume = raw.canonical()
    q = system.checks.quality
    slice_mm = float(volume.spacing.max())
    if slice_mm > q.max_slice_mm:  # ingest excludes every row of such a CT (image_quality)
        raise CohortError(f"{case.name}: refused (image_quality): voxels {slice_mm:.1f} mm apart exceed {q.max_slice_mm:g} mm")
    spacing = system.seg_settings["spacing"]
    image, _, affine = resample_volume(volume, None, spacing)
    verse, assignment = segment_volume(system.segmenter, image, spacing, system.seg_settings["hu_window"])
    labels = to_ct_grid(verse, affine, volume.affine, volume.array.shape)
    heights = level_heights(labels, volume.spacing)
    chosen = choose_levels(levels, heights)
    by_id = level_voxels(labels)
    rois = {lv: _roi(volume, by_id, lv, system) for lv in chosen}
    ready = {lv: r for lv, r in rois.items() if r["status"] == "classified"}
    folder = out / case.name
    folder.mkdir(parents=True, exist_ok=True)
    probs, cams = {}, None
    if ready:
        features = {"age": float("nan"), "sex": "", "dxa_t_score": float("nan"), **(clinical or {})}
        probs, cams, ds = classify(system, ready, case.name, features)
    entries = []
    for lv in chosen:
        r = rois[lv]
        entry = {"level": lv, "status": r["status"], "in_mask": lv in heights, "heights": heights.get(lv)}
        entry |= {k: r[k] for k in ("excluded", "flags", "qc", "note") if k in r}
        if lv in probs:
            p = float(probs[lv])
            i = list(ready).index(lv)
            png = folder / f"{case.name}_{lv}_gradcam.png"
            caption = f"{case.name} {lv}\np={p:.2f}"
            overlay_figure(
                [{"image": ds[i]["image"][0].numpy(), "cam": cams[i], "caption": caption}], png, f"{lv}: {_decision(p, system)}"
            )
            entry |= {"probability": p, "decision": _decision(p, system), "threshold": system.threshold, "gradcam": png.name}
        entries.append(entry)
    files = {}
    if options.get("nifti"):
        nib.save(nib.Nifti1Image(labels, volume.affine), folder / "mask.nii.gz")
        files["mask"] = "mask.nii.gz"
    if options.get("dicom_seg"):
        if series is None:
            notes.append("dicom_seg: skipped, the input is NIfTI (a DICOM SEG needs the source DICOM series)")
        elif not heights:
            notes.append("dicom_seg: skipped, the segmenter found no vertebral body")
        else:
            labels_raw = to_ct_grid(verse, affine, raw.affine, raw.array.shape)
            try:
                write_dicom_seg(folder / "seg.dcm", series, labels_raw, case.name, system)
                files["dicom_seg"] = "seg.dcm"
            except CohortError as exc:  # the prediction stands; only its SEG cannot be written
                notes.append(f"dicom_seg: skipped, {exc}")
    report = {
        "pseudonym": case.name,
        "system": {
            "version": system.meta.get("version"),
            "threshold": system.threshold,
            "rule": system.meta.get("threshold_rule"),
        },
        "series": None if series is None else series.name,
        "notes": [_scrub(n, case) for n in notes],
        "ct": {"shape": list(volume.array.shape), "spacing_mm": [round(float(s), 3) for s in volume.spacing]},
        "segmentation": {"levels": list(assignment.levels), "anchored": bool(assignment.anchored), "heights": heights},
        "levels_requested": levels if isinstance(levels, str) else list(levels),
        "levels": entries,
        "files": files,
        "seconds": round(time.perf_counter() - start, 2),
    }
    (folder / "report.json").write_text(json.dumps(report, indent=2))
    return report


def _decision(probability: float, system: System) -> str:
    """Acute when the probability reaches the frozen threshold (as `ovcf.eval.metrics.confusion` calls it)."""
    return "acute" if probability >= system.threshold else "chronic"


COPIED = (
    "SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID", "FrameOfReferenceUID", "Modality",
    "Rows", "Columns", "PixelSpacing", "ImageOrientationPatient", "ImagePositionPatient", "SliceThickness",
    "SamplesPerPixel", "PhotometricInterpretation", "BitsAllocated", "BitsStored", "HighBit", "PixelRepresentation",
    "PatientSex", "SeriesNumber", "InstanceNumber",
)  # fmt: skip


def _source_header(path: str, name: str):
    """The slice's geometry and UIDs, nothing that identifies the patient: PatientID and name become the pseudonym."""
    import pydicom
    from pydicom.dataset import Dataset

    ds = pydicom.dcmread(path, stop_before_pixels=True, force=True)
    clean = Dataset()
    for keyword in COPIED:
        if keyword in ds:
            setattr(clean, keyword, ds.data_element(keyword).value)
    clean.PatientID, clean.PatientName = name, f"{name}^"  # the caret: a one-component person name
    for keyword in ("PatientBirthDate", "AccessionNumber", "StudyID", "StudyDate", "StudyTime", "ReferringPhysicianName"):
        setattr(clean, keyword, "")
    return clean


def write_dicom_seg(path: Path, series, labels: np.ndarray, name: str, system: System) -> Path:
    """A DICOM SEG (highdicom) of the predicted levels on the source CT series, one segment per level.

    `labels` are VerSe ids on the series' own voxels as `load_series` reads them (column, row, slice
    in the validated slice order). The SEG references the CT's study, series and instances, so a
    PACS viewer overlays it; its patient is the pseudonym and it carries no other patient data.
    """
    import logging

    import highdicom as hd
    from pydicom.sr.codedict import codes

    from ovcf.data.series import validate

    logging.getLogger("highdicom").setLevel(logging.WARNING)  # its INFO lines name the source UIDs

    ordered, _ = validate(replace(series, notes=[]), system.checks.series)
    if any(h.frame >= 0 for h in ordered):
        raise CohortError(f"{name}: dicom_seg supports single-frame CT series; {series.name} is multi-frame")
    ids = [int(v) for v in np.unique(labels) if v]
    if not ids:
        raise CohortError(f"{name}: dicom_seg: the segmenter found no vertebral body, nothing to write")
    lut = np.zeros(max(max(ids), max(LEVEL_IDS.values())) + 1, np.uint8)
    names = {v: k for k, v in LEVEL_IDS.items()}
    algorithm = hd.AlgorithmIdentificationSequence(
        name="ovcf", version=str(system.meta.get("version", "")), family=codes.cid7162.ArtificialIntelligence
    )
    descriptions = []
    for number, verse in enumerate(ids, start=1):
        lut[verse] = number
        descriptions.append(
            hd.seg.SegmentDescription(
                segment_number=number,
                segment_label=names.get(verse, str(verse)),
                segmented_property_category=codes.SCT.AnatomicalStructure,
                segmented_property_type=codes.SCT.Vertebra,
                algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
                algorithm_identification=algorithm,
            )
        )
    pixels = np.stack([lut[labels[:, :, k].T] for k in range(labels.shape[2])])  # (frames, rows, columns)
    seg = hd.seg.Segmentation(
        source_images=[_source_header(h.path, name) for h in ordered],
        pixel_array=pixels,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions,
        series_instance_uid=hd.UID(),
        series_number=901,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer="ovcf",
        manufacturer_model_name="ovcf vertebral bodies",
        software_versions=str(system.meta.get("version", "")),
        device_serial_number="0",
        content_label="VERTEBRAE",
    )
    seg.save_as(path)
    return path


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
            }
        )
    return rows


def _levels_option(levels):
    if isinstance(levels, (ListConfig, list, tuple)):
        return [str(v) for v in (OmegaConf.to_container(levels) if isinstance(levels, ListConfig) else levels)]
    return str(levels)


def run(cfg: DictConfig) -> dict:
    from ovcf.data.pseudonym import load_key
    from ovcf.progress import track

    if not cfg.input or not cfg.output:
        raise ConfigError("pass input=DICOM_DIR (one patient, a whole export, or a NIfTI CT) and output=OUT_DIR")
    levels = _levels_option(cfg.levels)
    choose_levels(levels, {})  # a bad level name fails before any work
    device = cfg.device if cfg.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    folder = Path(cfg.system).expanduser() if cfg.system else latest_system(Path(cfg.paths.log_dir))
    system = load_system(folder, device)
    cases = find_cases(Path(cfg.input), load_key(Path(cfg.paths.key_file)), cfg.workers, cfg.progress)
    out = Path(cfg.output).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    clinical = {k: v for k, v in OmegaConf.to_container(cfg.clinical).items() if v is not None}
    done, refused, rows = [], {}, []
    print(f"System {system.meta.get('version', '?')} ({folder}); {len(cases)} patient(s)")
    for case in track(cases, len(cases), "Predicting", enabled=cfg.progress and len(cases) > 1):
        try:
            report = predict_patient(case, system, out, levels, clinical, nifti=cfg.nifti, dicom_seg=cfg.dicom_seg)
        except OvcfError as exc:
            message = _scrub(str(exc), case)
            refused[case.name] = message
            if len(cases) > 1:  # one patient's refusal is the run's error; among many, the others go on
                print(f"error: {message}", file=sys.stderr)
            continue
        done.append(case.name)
        rows += _summary_rows(report)
        calls = ", ".join(
            f"{e['level']} {e['decision']} (p={e['probability']:.2f})" if "decision" in e else f"{e['level']} {e['status']}"
            for e in report["levels"]
        )
        print(f"{case.name}: {calls or 'no fractured level'} - {report['seconds']:.1f} s")
    summary = {"system": str(folder), "threshold": system.threshold, "patients": done, "refused": refused}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    with open(out / "summary.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=SUMMARY)
        writer.writeheader()
        writer.writerows(rows)
    if not done:
        if len(refused) == 1:
            raise CohortError(next(iter(refused.values())))
        raise CohortError(f"all {len(refused)} patients were refused (see above); nothing predicted")
    print(f"{len(done)} of {len(cases)} patient(s) predicted" + (f", {len(refused)} refused" if refused else "") + f": {out}")
    return summary


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="predict")
def main(cfg: DictConfig):
    return guarded(run, cfg)


if __name__ == "__main__":
    check_overrides(sys.argv[1:])
    main()
