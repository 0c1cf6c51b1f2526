"""Cohort folder -> cached vertebra samples (one per included `clinical.csv` row).

For each patient: choose the CT series, read it in world coordinates, put the mask on its
voxels, and crop an isotropic cube around each fractured body. Results go to a cache folder
keyed by the cohort's path and the ROI settings, and are reused while the cohort's files are
unchanged, so a second run decodes no DICOM. One bad patient is excluded with its reason; the
others ingest.
"""

from __future__ import annotations

import csv
import datetime as dt
import hashlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from ovcf.contract import CLINICAL_CSV, DICOM_DIR, LEVEL_IDS, MASKS_DIR
from ovcf.data.clinical import ClinicalRow, check_clinical, read_clinical
from ovcf.data.dicom import Series, choose_ct, group_series, list_files, load_series, read_header
from ovcf.data.pseudonym import load_key, pseudonym
from ovcf.data.volume import Volume, load_nifti, mask_on_ct, resample_roi
from ovcf.errors import CohortError
from ovcf.parallel import pool_map

CACHE_VERSION = 2
INDEX_COLUMNS = ["row", "pseudonym", "center", "level", "label", "age", "sex", "dxa_t_score", "included", "reasons", "note"]


@dataclass(frozen=True)
class RoiSpec:
    """The cube cropped around each fractured body: `size` voxels of `spacing` mm per side."""

    size: int = 48
    spacing: float = 1.25


def check_cohort(cohort: Path) -> Path:
    """Resolves the folder and checks the contract's top-level layout, naming what is missing."""
    cohort = Path(cohort).expanduser().resolve()
    if not cohort.is_dir():
        raise CohortError(f"cohort folder {cohort} does not exist: set data.cohort to a folder with clinical.csv and dicom/")
    check_clinical(cohort / CLINICAL_CSV)
    if not (cohort / DICOM_DIR).is_dir():
        raise CohortError(f"{cohort / DICOM_DIR} not found: a cohort folder needs the DICOM export under dicom/")
    return cohort


def _fingerprint(cohort: Path) -> str:
    """Changes whenever clinical.csv or any file under dicom/ or masks/ changes (size or mtime)."""
    h = hashlib.sha256((cohort / CLINICAL_CSV).read_bytes())
    for sub in (DICOM_DIR, MASKS_DIR):
        for path in list_files(cohort / sub):
            st = os.stat(path)
            h.update(f"{os.path.relpath(path, cohort)}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def cache_folder(cohort: Path, cache_root: Path, roi: RoiSpec) -> Path:
    name = hashlib.sha256(json.dumps([str(cohort), asdict(roi), CACHE_VERSION]).encode()).hexdigest()[:16]
    return Path(cache_root).expanduser() / "cohorts" / name


def _read_headers(paths: list[str]):
    headers = [read_header(p) for p in paths]
    return [h for h in headers if h is not None], sum(h is None for h in headers)


def _parse_dicom_date(text: str) -> dt.date | None:
    try:
        return dt.datetime.strptime(text[:8], "%Y%m%d").date()
    except ValueError:
        return None


def _ingest_patient(job: dict) -> list[dict]:
    """Samples of one patient's rows, written to `<out>/samples/<pseudonym>.npz`."""
    rows: list[ClinicalRow] = job["rows"]
    roi: RoiSpec = job["roi"]
    results = {r.row: {"reasons": r.exclusions(), "note": "; ".join(r.problems)} for r in rows}
    arrays: dict[str, np.ndarray] = {}

    def fail_all(reason: str, note: str) -> list[dict]:
        for r in rows:
            results[r.row]["reasons"].append(reason)
            results[r.row]["note"] = note
        return _finish(job, results, arrays)

    ct = choose_ct(job["series"], rows[0].ct_series_uid or None)
    if ct is None:
        return fail_all("no_ct", "no axial CT series for this patient")
    try:
        volume = load_series(ct).canonical()
    except CohortError as exc:
        return fail_all("unreadable", str(exc))
    dicom_date = _parse_dicom_date(ct.slices[0].date)
    for r in rows:  # the interval may need the CT date from DICOM
        if r.ct_date is None:
            results[r.row]["reasons"] = r.exclusions(dicom_date)

    labels = None
    if job["mask"] is not None:
        try:
            labels = mask_on_ct(load_nifti(job["mask"]), volume, f"{job['pseudonym']}.nii.gz")
        except CohortError as exc:
            return fail_all("mask_mismatch", str(exc))
        except Exception as exc:  # noqa: BLE001 - nibabel raises many types for broken files
            return fail_all("mask_mismatch", f"mask of {job['pseudonym']} unreadable: {exc}")

    for r in rows:
        res = results[r.row]
        if labels is None:
            res["reasons"].append("no_mask")
            continue
        level_id = LEVEL_IDS.get(r.level)
        voxels = np.argwhere(labels == level_id) if level_id is not None else np.empty((0, 3))
        if len(voxels) == 0:
            res["reasons"].append("level_not_in_fov")
            res["note"] = f"level {r.level} not in the mask"
            continue
        if res["reasons"]:
            continue
        centre = volume.world(voxels.mean(axis=0))
        image = resample_roi(volume, centre, roi.size, roi.spacing)
        body = resample_roi(
            Volume((labels == level_id).astype(np.float32), volume.affine), centre, roi.size, roi.spacing, "nearest", 0.0
        )
        arrays[f"r{r.row}_image"] = np.clip(np.rint(image), -32768, 32767).astype(np.int16)
        arrays[f"r{r.row}_mask"] = (body > 0.5).astype(np.uint8)
    return _finish(job, results, arrays)


def _finish(job: dict, results: dict, arrays: dict) -> list[dict]:
    if arrays:
        np.savez(Path(job["out"]) / "samples" / f"{job['pseudonym']}.npz", **arrays)
    out = []
    for r in job["rows"]:
        res = results[r.row]
        out.append(
            {
                "row": r.row,
                "pseudonym": job["pseudonym"],
                "center": r.center,
                "level": r.level,
                "label": r.label,
                "age": "" if r.age is None else r.age,
                "sex": r.sex,
                "dxa_t_score": "" if r.dxa_t_score is None else r.dxa_t_score,
                "included": not res["reasons"],
                "reasons": ";".join(dict.fromkeys(res["reasons"])),
                "note": res["note"],
            }
        )
    return out


def ingest(
    cohort: str | Path,
    cache_root: str | Path,
    roi: RoiSpec = RoiSpec(),
    key_file: str | Path = "~/.cache/ovcf/pseudonym.key",
    num_workers: int = 1,
    progress: bool = True,
) -> Path:
    """Ingests `cohort` (or reuses its fresh cache) and returns the cache folder.

    The folder holds `index.csv` (one line per clinical row, pseudonymised, with `included` and
    exclusion `reasons`) and `samples/<pseudonym>.npz` (ROI image in HU and body mask per row).
    """
    cohort = check_cohort(Path(cohort))
    out = cache_folder(cohort, Path(cache_root), roi)
    fingerprint = _fingerprint(cohort)
    stamp = out / "fingerprint.json"
    if stamp.exists() and json.loads(stamp.read_text()).get("fingerprint") == fingerprint:
        return out

    rows = read_clinical(cohort / CLINICAL_CSV)
    key = load_key(Path(key_file))
    files = list_files(cohort / DICOM_DIR)
    chunks = [files[i : i + 256] for i in range(0, len(files), 256)]
    scanned = pool_map(_read_headers, chunks, num_workers, "Reading DICOM headers", progress)
    headers = [h for hs, _ in scanned for h in hs]
    by_patient: dict[str, list[Series]] = {}
    for s in group_series(headers):
        by_patient.setdefault(s.patient_id, []).append(s)

    patients: dict[str, list[ClinicalRow]] = {}
    for r in rows:
        patients.setdefault(r.patient_id, []).append(r)
    (out / "samples").mkdir(parents=True, exist_ok=True)
    jobs = []
    for pid, prow in patients.items():
        mask = cohort / MASKS_DIR / f"{pid}.nii.gz"
        jobs.append(
            {
                "pseudonym": pseudonym(pid, key),
                "rows": prow,
                "series": by_patient.get(pid, []),
                "mask": mask if mask.is_file() else None,
                "roi": roi,
                "out": str(out),
            }
        )
    results = pool_map(_ingest_patient, jobs, num_workers, "Ingesting patients", progress)
    index = sorted((r for rs in results for r in rs), key=lambda r: r["row"])
    with open(out / "index.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=INDEX_COLUMNS)
        writer.writeheader()
        writer.writerows(index)
    stamp.write_text(json.dumps({"fingerprint": fingerprint, "roi": asdict(roi), "version": CACHE_VERSION}))
    return out


def read_index(cache: Path) -> list[dict]:
    """The rows of `index.csv`, typed."""
    with open(Path(cache) / "index.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    for r in rows:
        r["row"] = int(r["row"])
        r["included"] = r["included"] == "True"
        r["age"] = float(r["age"]) if r["age"] else float("nan")
        r["dxa_t_score"] = float(r["dxa_t_score"]) if r["dxa_t_score"] else float("nan")
    return rows
