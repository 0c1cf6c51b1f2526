"""Generates a whole synthetic two-center cohort in the cohort format (`ovcf.contract`).

Each patient gets its own random stream derived from (seed, center, index), so a cohort is the
same bytes whatever the number of worker processes.
"""

from __future__ import annotations

import csv
import datetime as dt
import hashlib
import json
import logging
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np

from ovcf.atomic import exclusive
from ovcf.contract import (
    CLINICAL_CSV,
    DICOM_DIR,
    EXCLUSION_CODES,
    LEVEL_IDS,
    LEVEL_ORDER,
    MASKS_DIR,
    MAX_CT_MRI_DAYS,
    MIN_AGE,
    REQUIRED_COLUMNS,
)
from ovcf.errors import ConfigError
from ovcf.parallel import pool_map
from ovcf.synth import GENERATOR_VERSION
from ovcf.synth.anatomy import ablation_cues, apply_fracture_heights, draw_fracture, draw_spine
from ovcf.synth.difficulty import FEATURES, baseline_auc, fracture_features
from ovcf.synth.export import PatientHeader, write_ct_series, write_localizer, write_mask, write_mr_series
from ovcf.synth.implants import IMPLANT_KINDS, add_cement, add_screws
from ovcf.synth.montage import sagittal_view, write_montage
from ovcf.synth.phantom import render
from ovcf.synth.scanner import Scanner, acquire, make_grid
from ovcf.synth.style import check_styles, draw_look, draw_variants

log = logging.getLogger(__name__)

COLUMNS = [*REQUIRED_COLUMNS, "ct_date", "etiology", "ct_series_uid", "signs"]  # signs: extra, for sign supervision
_FIRST = ["ANNA", "MARIA", "LI", "WEI", "HELGA", "ROSA", "JOHN", "PETER", "YAN", "EVA"]
_LAST = ["SMITH", "WANG", "MUELLER", "ROSSI", "CHEN", "NOVAK", "GARCIA", "ZHANG", "BROWN", "LEE"]
_INSTITUTIONS = {0: "Synthetic University Hospital", 1: "Phantom General Hospital"}
PLANTABLE = EXCLUSION_CODES  # every protocol exclusion can be planted
ROW_PROBLEMS = ("age", "etiology", "interval", "no_ct", "implant", "image_quality", "unreadable")  # exclude all rows
PLANTED_NOISE_HU = 150.0
THICK_MM = 5.0
EXPORT_DEFAULTS = {"localizer": True, "mr_series": True, "thick_ct_fraction": 0.2, "extensions": [".dcm", ""]}


def _patient(job: dict) -> tuple[list[dict], dict]:
    """Draws, renders, acquires and writes one patient; returns its CSV rows and ground truth."""
    cfg, center, c_idx, p_idx = job["cfg"], job["center"], job["center_index"], job["patient_index"]
    rng = np.random.default_rng([cfg["seed"], c_idx, p_idx])
    style_rng = np.random.default_rng([cfg["seed"], c_idx, p_idx, 3])  # the style and sign variants: their own stream
    look = draw_look(style_rng, *check_styles(cfg))
    scanner = look.scanner_for(Scanner(**cfg["centers"][center]))

    sex = "F" if rng.random() < 0.75 else "M"
    age = int(np.clip(round(rng.normal(74, 8)), 55, 95))
    t_score = round(float(np.clip(rng.normal(-2.9, 0.7), -5.0, -1.0)), 1)
    vertebrae, visible = draw_spine(rng, tuple(cfg["n_levels"]), t_score)

    lo, hi = cfg["fractures_per_patient"]
    n_frac = min(int(rng.integers(lo, hi + 1)), len(visible))
    levels = list(rng.choice(visible, size=n_frac, replace=False))
    by_name = {v.level: v for v in vertebrae}
    for level in levels:
        label = "acute" if rng.random() < cfg["acute_fraction"] else "chronic"
        variants = draw_variants(style_rng, look)
        by_name[level].fracture = draw_fracture(
            rng, label, cfg["signs"], cfg["grades"], cfg.get("difficulty", 0.5), tuple(cfg.get("ablate") or ()), variants
        )
    apply_fracture_heights(vertebrae)

    problem = job.get("problem")
    if problem == "image_quality":  # a low-dose or obese-patient scan: noise hides the fracture signs
        scanner = replace(scanner, noise_hu=PLANTED_NOISE_HU, noise_grain_mm=None, blotch=0.0)
    scanner_rng = np.random.default_rng([cfg["seed"], c_idx, p_idx, 1])
    grid = make_grid(vertebrae, scanner, scanner_rng)
    ideal, labels = render(vertebrae, grid, rng, cfg.get("tissues"), look)
    if problem == "implant" and job["implant"] == "screws":
        add_screws(ideal, grid, vertebrae, levels, np.random.default_rng([cfg["seed"], c_idx, p_idx, 2]))
    elif problem == "implant":
        add_cement(ideal, labels, grid, levels)
    hu = acquire(ideal, grid, scanner, scanner_rng)
    features = fracture_features(hu, labels, grid.spacing, {LEVEL_IDS[level]: level for level in levels})
    views = {level: sagittal_view(hu, labels, grid, LEVEL_IDS[level]) for level in levels} if job["report"] else {}

    patient_id = f"{c_idx + 1}{int(rng.integers(0, 10000)):04d}{p_idx:03d}"
    ct_date = dt.date(2019, 1, 1) + dt.timedelta(days=int(rng.integers(0, 5 * 365)))
    birth = ct_date - dt.timedelta(days=int(age * 365.25 + rng.integers(0, 365)))
    header = PatientHeader(
        patient_id=patient_id,
        name=f"{rng.choice(_LAST)}^{rng.choice(_FIRST)}",
        birth_date=birth.strftime("%Y%m%d"),
        sex=sex,
        age=age,
        institution=_INSTITUTIONS.get(c_idx, f"Hospital {center}"),
        accession=f"ACC{int(rng.integers(10**7, 10**8))}",
        physician=f"DR^{rng.choice(_LAST)}",
        study_date=ct_date.strftime("%Y%m%d"),
        uid_seed=f"{cfg['seed']}-{center}-{p_idx}",
    )
    out = Path(job["out"])
    export = {**EXPORT_DEFAULTS, **(cfg.get("export") or {})}
    extension = export["extensions"][c_idx % len(export["extensions"])]
    study = out / DICOM_DIR / f"{center}_{p_idx:04d}" / header.study_date
    if problem != "no_ct":  # the no_ct patient's export holds only the MRI
        if export["localizer"]:
            write_localizer(study / "1_topogram", hu, grid, scanner, header, extension)
        folder = study / "2_spine"
        write_ct_series(folder, hu, grid, scanner, header, extension=extension)
        if problem == "unreadable":  # an export interrupted mid-transfer: one slice lost half its pixels
            victim = sorted(folder.iterdir())[len(list(folder.iterdir())) // 2]
            victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
        if scanner_rng.random() < export["thick_ct_fraction"]:  # a soft-tissue recon in thick slices
            thick, thick_grid = _thick_slices(hu, grid, THICK_MM)
            thick_scanner = replace(scanner, slice_thickness=THICK_MM, slice_spacing=THICK_MM, sharpen=0.0)
            write_ct_series(
                study / "4_soft", thick, thick_grid, thick_scanner, header, 4, extension=extension, description="Abdomen 5.0"
            )
    if export["mr_series"] or problem == "no_ct":
        write_mr_series(study / "5_mr", hu, grid, scanner, header, extension)
    write_mask(out / MASKS_DIR / f"{patient_id}.nii.gz", labels, grid, job["mask_orientation"])

    rows, truth = [], []
    for level in levels:
        f = by_name[level].fracture
        mri = ct_date + dt.timedelta(days=int(rng.integers(0, 12)))
        if problem == "interval":
            mri = ct_date + dt.timedelta(days=int(rng.integers(MAX_CT_MRI_DAYS + 5, 60)))
        rows.append(
            {
                "patient_id": patient_id,
                "center": center,
                "age": age,
                "sex": sex,
                "dxa_t_score": t_score,
                "mri_date": mri.isoformat(),
                "level": level,
                "label": f.label,
                "ct_date": ct_date.isoformat(),
                "etiology": "malignancy" if problem == "etiology" else "osteoporotic",
                "ct_series_uid": "",
                "signs": ";".join(sorted(f.signs)),  # the signs the image shows (ablated ones are not)
            }
        )
        truth.append({"patient_id": patient_id, "level": level, **asdict(f), "features": features.get(LEVEL_IDS[level])})
    if problem == "age":
        for r in rows:
            r["age"] = int(rng.integers(MIN_AGE - 10, MIN_AGE))
    planted = {r["level"]: problem for r in rows} if problem in ROW_PROBLEMS else {}
    if problem == "level_not_in_fov":  # a row naming a level the scan does not reach
        far = LEVEL_ORDER[max(LEVEL_ORDER.index(visible[0]) - 4, 0)]
        rows.append({**rows[0], "level": far, "label": str(rng.choice(["acute", "chronic"])), "signs": ""})
        planted[far] = problem
    truth = {
        "patient_id": patient_id,
        "center": center,
        "visible_levels": visible,
        "style": asdict(look),  # the style's name and its drawn parameters
        "fractures": truth,
        "planted": planted,  # level -> the exclusion the reader must find for that row
        "implant": job["implant"] if problem == "implant" else None,
    }
    return rows, truth, views


def _thick_slices(hu: np.ndarray, grid, thickness: float):
    """Averages the thin slices into slabs `thickness` mm thick, edge to edge (a second, thick recon)."""
    n = max(int(round(thickness / grid.spacing[2])), 1)
    slabs = hu.shape[2] // n
    thick = hu[:, :, : slabs * n].reshape(hu.shape[0], hu.shape[1], slabs, n).mean(axis=3)
    z = grid.z[: slabs * n].reshape(slabs, n).mean(axis=1)
    return thick, replace(grid, z=z)


def _assign_problems(plant: dict, n_patients: int, seed: int) -> dict[int, str]:
    """Patient index -> planted exclusion; `plant` says how many patients of each center get each."""
    unknown = set(plant) - set(PLANTABLE)
    if unknown:
        raise ConfigError(f"synthetic.plant: unknown problem(s) {sorted(unknown)}; plantable: {', '.join(PLANTABLE)}")
    wanted = [code for code in PLANTABLE for _ in range(int(plant.get(code, 0)))]
    if len(wanted) > n_patients:
        raise ConfigError(f"synthetic.plant asks for {len(wanted)} problem patients per center but there are {n_patients}")
    chosen = np.random.default_rng([seed, 99]).permutation(n_patients)[: len(wanted)]
    return {int(i): code for i, code in zip(chosen, wanted)}


def generate_cohort(out: str | Path, num_workers: int = 1, progress: bool = True, report: bool = True, **cfg) -> Path:
    """Writes `clinical.csv`, `dicom/`, `masks/` and `synth.json` (ground truth) into `out`.

    Args:
        out: folder to create; an existing cohort there is overwritten file by file.
        num_workers: processes used to render patients (the output does not depend on it).
        progress: show a progress bar.
        report: also write `difficulty.json` (the baseline AUC) and `montage.png`.
        **cfg: generator parameters, as in ``conf/synthetic/default.yaml``.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    centers = list(cfg["centers"])
    if not 0.0 <= float(cfg.get("difficulty", 0.5)) <= 1.0:
        raise ConfigError(
            f"synthetic.difficulty must lie in [0, 1] (0 obvious, 0.5 default, 1 no signs), got {cfg['difficulty']}"
        )
    check_styles(cfg)
    cues = ablation_cues(cfg["signs"])
    unknown = set(cfg.get("ablate") or ()) - set(cues)
    if unknown:
        raise ConfigError(f"synthetic.ablate names {', '.join(sorted(unknown))}: choose from {', '.join(cues)}")
    rendered = cfg.get("render_centers") or centers
    if set(rendered) - set(centers):
        raise ConfigError(f"synthetic.render_centers={list(rendered)}: the centers are {', '.join(centers)}")
    problems = _assign_problems(cfg.get("plant") or {}, cfg["patients_per_center"], cfg["seed"])
    orientations = cfg.get("mask_orientations", ["LPS"])
    # planted implants alternate between cement and screws, starting differently per center
    implant_patients = sorted(i for i, code in problems.items() if code == "implant")
    jobs = [
        {
            "cfg": cfg,
            "out": str(out),
            "center": center,
            "center_index": c_idx,
            "patient_index": p_idx,
            "mask_orientation": orientations[c_idx % len(orientations)],
            "problem": problems.get(p_idx),
            "implant": IMPLANT_KINDS[(c_idx + implant_patients.index(p_idx)) % 2] if p_idx in implant_patients else None,
            "report": report,
        }
        for c_idx, center in enumerate(centers)
        if center in rendered  # a center left out keeps the others' patients as they are in the full cohort
        for p_idx in range(cfg["patients_per_center"])
    ]
    results = pool_map(_patient, jobs, num_workers, "Generating phantoms", progress)
    truths = [t for _, t, _ in results]

    (out / DICOM_DIR / "export_log.txt").write_text("PACS export finished; files per patient folder.\n")  # not DICOM
    with open(out / CLINICAL_CSV, "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=COLUMNS)
        writer.writeheader()
        for rows, _, _ in results:
            writer.writerows(rows)
    (out / "synth.json").write_text(json.dumps({"parameters": cfg, "patients": truths}, indent=1, default=float))
    if report:
        write_report(out, truths, [views for _, _, views in results], cfg["seed"])
    return out


def write_report(out: Path, truths: list[dict], views: list[dict], seed: int) -> dict:
    """Writes `difficulty.json` (the baseline AUC) and `montage.png` next to the cohort.

    Only patients without a planted exclusion count: they are the ones a model trains on.
    """
    fractures, tiles = [], {}
    for truth, patient_views in zip(truths, views):
        if truth["planted"]:
            continue
        for f in truth["fractures"]:
            if f["features"] is None:
                continue
            fractures.append({**f["features"], "label": f["label"], "patient_id": truth["patient_id"], "center": truth["center"]})
            view = patient_views.get(f["level"])
            if view is not None:
                signs = ", ".join(name.replace("_", " ") for name in f["signs"]) or "no sign"
                caption = f"{truth['center']} {f['level']} G{f['grade']} {f['morphology']} {f['label'].upper()}: {signs}"
                tiles.setdefault((f["label"], truth["center"]), []).append((view, caption))
    report = baseline_auc(fractures, seed)
    report["features"] = list(FEATURES)
    report["means"] = {
        label: {k: float(np.mean([r[k] for r in fractures if r["label"] == label])) for k in FEATURES}
        for label in ("acute", "chronic")
        if any(r["label"] == label for r in fractures)
    }
    (out / "difficulty.json").write_text(json.dumps(report, indent=1))
    per_group = max(1, 32 // max(len(tiles), 1))  # as many acute as chronic tiles from every center
    picked = [t for group in sorted(tiles) for t in tiles[group][:per_group]]
    if picked:
        write_montage(out / "montage.png", picked)
    return report


def difficulty_summary(out: Path) -> str:
    """One paragraph on `difficulty.json` and the montage, for the command line."""
    report = json.loads((Path(out) / "difficulty.json").read_text())

    def fmt(v):
        return "n/a (too few fractures)" if v is None else f"{v:.3f}"

    return (
        f"Difficulty: hand-crafted baseline ({', '.join(report['features'])}) AUC {fmt(report['cv_auc'])} "
        f"(patient-grouped 5-fold CV, {report['fractures']} fractures, {report['acute']} acute), "
        f"{fmt(report['external_auc'])} fitted on the first center and scored on the others.\n"
        f"Montage of mid-sagittal views: {(Path(out) / 'montage.png').resolve()}"
    )


OPTIONAL = ("ablate", "render_centers")  # generator options that are off by default


def synthetic_folder(data_dir: Path, params: dict) -> Path:
    """Folder of a generated cohort under `data_dir`, named by the generator's version and parameters."""
    # Options that are off leave the name as it was before they existed.
    params = {k: v for k, v in params.items() if k not in ("num_workers", "progress") and (v or k not in OPTIONAL)}
    key = json.dumps([GENERATOR_VERSION, params], sort_keys=True, default=str)
    digest = hashlib.sha256(key.encode()).hexdigest()[:12]
    return Path(data_dir).expanduser() / "synthetic" / f"seed{params.get('seed', 0)}-{digest}"


def synthetic_cohort(data_dir: Path, params: dict, num_workers: int = 1, progress: bool = True) -> Path:
    """The synthetic cohort of `params` under `data_dir` (absolute), generated on first use and reused after."""
    path = synthetic_folder(data_dir, params).resolve()
    with exclusive(path):  # runs started side by side: one generates, the others wait and reuse
        if not (path / "synth.json").exists():
            log.info(f"Generating the synthetic cohort into {path} (once; later runs reuse it)")
            params = {k: v for k, v in params.items() if k != "num_workers"}
            generate_cohort(path, num_workers=num_workers, progress=progress, **params)
            log.info(difficulty_summary(path))
    return path
