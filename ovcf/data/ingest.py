"""Cohort folder -> cached vertebra samples (one per included `clinical.csv` row) and its flow.

For each patient: choose the CT series, validate and read it in world coordinates, put the mask
on its voxels, apply the protocol's exclusions, and crop an isotropic cube around each fractured
body. Each patient is written to the cache as soon as it is done, under its pseudonym, with the
content hash of everything it was made from: a re-run redoes only patients whose files, rows or
settings changed, and a crash loses nothing already written. One bad patient is excluded with
its reason; the others ingest.
"""

from __future__ import annotations

import csv
import datetime as dt
import hashlib
import json
import os
from collections import Counter
from dataclasses import asdict
from pathlib import Path

import numpy as np

from ovcf.atomic import exclusive, write_atomic, write_csv, write_json
from ovcf.contract import CLINICAL_CSV, DICOM_DIR, MASKS_DIR, MAX_CT_MRI_DAYS, SIGNS_COLUMN, SIGNS_UNKNOWN
from ovcf.data.clinical import ClinicalRow, check_clinical, check_one_center, read_centers, read_clinical
from ovcf.data.ct import NOT_CANDIDATE, UNUSED, USED, IngestChecks, SpineQc, check_level, choose_ct, scan_folder
from ovcf.data.dicom import FILE_KINDS, find_files
from ovcf.data.flow import write_flow
from ovcf.data.pseudonym import load_key, pseudonym
from ovcf.data.quality import level_voxels
from ovcf.data.roi import RoiSpec
from ovcf.data.series import Series
from ovcf.data.totalseg import mask_files, read_totalseg
from ovcf.data.volume import Volume, load_nifti, resample_volume
from ovcf.errors import CohortError, ConfigError
from ovcf.parallel import pool_map, worker_pool

CACHE_VERSION = 5
# Bumped when index.csv gains content that the patients' samples do not depend on (2: the `signs` column):
# a cache stamped before is indexed again (its samples are reused), so a CSV that already had the column
# when an older ovcf cached it gets its signs.
INDEX_VERSION = 2
INDEX_COLUMNS = [
    "row", "pseudonym", "center", "level", "label", "age", "sex", "dxa_t_score", "included", "reasons", "flags", "note",
    SIGNS_COLUMN,
]  # fmt: skip


def check_cohort(cohort: Path) -> Path:
    """Resolves the folder and checks the contract's top-level layout, naming what is missing."""
    cohort = Path(cohort).expanduser().resolve()
    if not cohort.is_dir():
        raise CohortError(
            f"cohort folder {cohort} does not exist: set data.cohort (ovcf.train) or cohort= (ovcf.ingest) "
            "to a folder with clinical.csv and dicom/"
        )
    check_clinical(cohort / CLINICAL_CSV)
    if not (cohort / DICOM_DIR).is_dir():
        raise CohortError(f"{cohort / DICOM_DIR} not found: a cohort folder needs the DICOM export under dicom/")
    return cohort


def check_centers(cohort: Path, dev_center: str | None, external_center: str | None) -> tuple[str, str | None]:
    """(development, external) center of a cohort folder, whose layout `check_cohort` checks first;
    external is None when the cohort holds one center only. The data module calls it before any work, and the commands call
    it before they load torch, so a wrong folder or center name fails in a second."""
    found = read_centers(check_cohort(cohort) / CLINICAL_CSV)
    listing = ", ".join(found) or "none"
    for key, name in (("dev_center", dev_center), ("external_center", external_center)):
        if name is not None and name not in found:
            raise ConfigError(f"data.{key}='{name}' is not a center of {Path(cohort).expanduser()}; centers found: {listing}")
    if not found:
        raise ConfigError(f"{CLINICAL_CSV} names no center: fill its center column")
    dev = dev_center if dev_center is not None else found[0]
    rest = [c for c in found if c != dev]
    ext = external_center if external_center is not None else (rest[0] if rest else None)
    if dev == ext:
        raise ConfigError(
            f"data.dev_center and data.external_center are both '{dev}': name two different centers "
            f"(centers found: {listing}), or leave data.external_center null"
        )
    return dev, ext


def _fingerprint(cohort: Path, settings: str) -> tuple[str, int]:
    """Cheap staleness test: changes whenever any input file's size or mtime, or a setting, changes.

    Broken links are skipped (they have no size), but how many there are is hashed: the flow report
    counts them. Returns the digest and the broken links under `masks/` (the scan counts `dicom/`'s).
    """
    h, skipped = hashlib.sha256(settings.encode()), {}
    h.update((cohort / CLINICAL_CSV).read_bytes())
    for sub in (DICOM_DIR, MASKS_DIR):
        files, skipped[sub] = find_files(cohort / sub)
        for path in files:
            st = os.stat(path)
            h.update(f"{os.path.relpath(path, cohort)}|{st.st_size}|{st.st_mtime_ns}\n".encode())
        h.update(f"{sub} skipped {sorted(skipped[sub].items())}\n".encode())
    return h.hexdigest(), skipped[MASKS_DIR]["broken_link"]


def cache_folder(cohort: Path, cache_root: Path, roi: RoiSpec, masks: Path | None = None) -> Path:
    key = [str(cohort), asdict(roi), CACHE_VERSION] + ([str(masks)] if masks is not None else [])
    name = hashlib.sha256(json.dumps(key).encode()).hexdigest()[:16]
    return Path(cache_root).expanduser() / "cohorts" / name


def cache_fingerprint(cache: Path) -> str | None:
    """The fingerprint (cohort files and settings) stamped on an ingest cache folder; None: no stamp."""
    stamp = Path(cache) / "fingerprint.json"
    return json.loads(stamp.read_text()).get("fingerprint") if stamp.is_file() else None


def _parse_dicom_date(text: str) -> dt.date | None:
    try:
        return dt.datetime.strptime(text[:8], "%Y%m%d").date()
    except ValueError:
        return None


class _Patient:
    """Results of one patient's rows while they are worked out."""

    def __init__(self, job: dict):
        self.job, self.rows = job, job["rows"]
        self.results = {
            r.row: {"reasons": r.exclusions(), "flags": list(r.flags), "notes": ["; ".join(r.problems), *r.notes]}
            for r in self.rows
        }
        self.arrays: dict[str, np.ndarray] = {}
        self.series: list[dict] = []

    def add(self, row: int | None, reason: str | None = None, note: str = "", flag: str | None = None) -> None:
        for r in self.rows if row is None else [r for r in self.rows if r.row == row]:
            res = self.results[r.row]
            if reason:
                res["reasons"].append(reason)
            if flag:
                res["flags"].append(flag)
            if note:
                res["notes"].append(self.scrub(note))

    def scrub(self, text: str) -> str:
        """Removes what could identify the patient from a message: paths and the original ID."""
        text = text.replace(self.job["cohort"], "<cohort>")
        return text.replace(self.rows[0].patient_id, self.job["pseudonym"]) if self.rows[0].patient_id else text


def _ingest_patient(job: dict) -> dict:
    """One patient's rows, samples and series report, written to the cache under its pseudonym."""
    p = _Patient(job)
    try:
        _work(p)
    except Exception as exc:  # noqa: BLE001 - one patient's unexpected failure must not stop the cohort
        p.arrays.clear()
        p.add(None, "unreadable", f"unexpected error while ingesting: {type(exc).__name__}: {exc}")
        p.job = {**job, "hash": None}  # not a verdict on the data: retried on the next run
    return _finish(p)


def _work(p: _Patient) -> None:
    job, checks, roi = p.job, p.job["checks"], p.job["roi"]
    mask = None
    if job["broken_mask"]:
        p.add(None, "mask_mismatch", f"mask of {job['pseudonym']} is a broken link; restore the file or remove the link")
        return
    if job["mask"] is not None:
        try:  # a folder: TotalSegmentator's output, whose whole vertebrae become bodies
            mask = read_totalseg(job["mask"]) if job["mask"].is_dir() else load_nifti(job["mask"])
        except Exception as exc:  # noqa: BLE001 - nibabel raises many types for broken files
            p.add(None, "mask_mismatch", p.scrub(f"mask of {job['pseudonym']} unreadable: {type(exc).__name__}: {exc}"))
            return
    named = p.rows[0].ct_series_uid or None
    choice = choose_ct(job["series"], checks.series, named, mask, p.scrub, f"mask of {job['pseudonym']}")
    p.series = choice.report
    if choice.volume is None:
        p.add(None, choice.reason, choice.message)
        return
    for note in choice.notes:
        p.add(None, note=note, flag=note.split(":")[0])
    volume, labels = choice.volume.canonical(), choice.labels
    dicom_date = _parse_dicom_date(choice.series.slices[0].date)
    for r in p.rows:  # without ct_date in the CSV, the interval uses the series' DICOM date
        if r.ct_date is None and "interval" in r.exclusions(dicom_date):
            p.add(r.row, "interval", f"CT (DICOM date) and MRI more than {MAX_CT_MRI_DAYS} days apart")
    if labels is None:
        p.add(None, "no_mask", "no mask file: run python -m ovcf.segment and use data.roi_source=predicted", flag="no_mask")
        if roi.volume_spacing:  # segment predicts the mask from this
            p.arrays.update(_volume_arrays(volume, None, roi.volume_spacing))
        return

    by_id = level_voxels(labels)
    spine = SpineQc(volume, by_id, checks.quality)
    for r in p.rows:
        check = check_level(volume, by_id, r.level, checks.quality, spine)
        for reason in check.reasons:
            p.add(r.row, reason)
        for flag in check.flags:
            p.add(r.row, flag=flag)
        for note in check.notes:
            p.add(r.row, note=note)
        if check.centre is None:
            continue
        p.results[r.row]["qc"] = check.qc
        if p.results[r.row]["reasons"]:
            continue
        p.arrays[f"r{r.row}_image"], p.arrays[f"r{r.row}_mask"] = check.cut(volume, roi)
    if p.arrays and roi.volume_spacing:  # a patient the study keeps: its whole CT serves segmentation
        p.arrays.update(_volume_arrays(volume, labels, roi.volume_spacing))


def _volume_arrays(volume: Volume, labels: np.ndarray | None, spacing: float) -> dict:
    """The whole CT (and labels) at `spacing` mm, and the CT's own grid, where predicted masks go back to."""
    image, labels_rs, affine = resample_volume(volume, labels, spacing)
    arrays = {
        "volume_image": np.clip(np.rint(image), -32768, 32767).astype(np.int16),
        "volume_affine": affine,
        "ct_affine": volume.affine,
        "ct_shape": np.array(volume.array.shape),
    }
    if labels_rs is not None:
        arrays["volume_labels"] = labels_rs.astype(np.uint8)
    return arrays


def _finish(p: _Patient) -> dict:
    out = Path(p.job["out"])
    name = p.job["pseudonym"]
    if p.arrays:
        write_atomic(out / "samples" / f"{name}.npz", lambda tmp: _savez(tmp, p.arrays))
    rows = []
    for r in p.rows:
        res = p.results[r.row]
        rows.append(
            {
                "row": r.row,
                "pseudonym": name,
                "center": r.center,
                "level": r.level,
                "label": r.label,
                "age": r.age,
                "sex": r.sex,
                "dxa_t_score": r.dxa_t_score,
                "included": not res["reasons"],
                "reasons": list(dict.fromkeys(res["reasons"])),
                "flags": list(dict.fromkeys(res["flags"])),
                "note": "; ".join(n for n in dict.fromkeys(res["notes"]) if n),
                "qc": res.get("qc", {}),  # the measures behind implant and image_quality, to tune thresholds
            }
        )
    record = {"hash": p.job["hash"], "rows": rows, "series": p.series}
    write_json(out / "patients" / f"{name}.json", record)
    return record


def _savez(path: Path, arrays: dict) -> None:
    with open(path, "wb") as fh:  # a file object: np.savez would add ".npz" to a path
        np.savez(fh, **arrays)


def _patient_hash(rows: list[ClinicalRow], series: list[Series], mask: Path | None, settings: str) -> str:
    h = hashlib.sha256(settings.encode())
    # Sign labels change no sample: adding the column to a cached cohort re-indexes it without re-reading its CT.
    h.update(json.dumps([asdict(r) | {"signs": None} for r in rows], default=str).encode())
    for digest in sorted({s.digest for ser in series for s in ser.slices}):
        h.update(digest.encode())
    if mask is None:
        h.update(b"no mask")
    elif mask.is_dir():  # TotalSegmentator's folder: the files its mask is made of
        for part in mask_files(mask):
            h.update(part.name.encode() + hashlib.sha256(part.read_bytes()).digest())
    else:
        h.update(hashlib.sha256(mask.read_bytes()).digest())
    return h.hexdigest()


def _jobs(
    cohort: Path, rows: list[ClinicalRow], by_patient: dict, key: bytes, settings: str, roi, checks, out: Path, masks=None
) -> list[dict]:
    """One job per patient of the CSV, with the content hash that decides whether its cache is fresh.

    Masks come from the cohort (`masks/<patient_id>.nii.gz`, else a folder `masks/<patient_id>/` of TotalSegmentator
    output) or, when `masks` names a folder of predicted masks, from `<masks>/<pseudonym>.nii.gz` as `ovcf.segment`
    writes them.
    """
    patients: dict[str, list[ClinicalRow]] = {}
    for r in rows:
        patients.setdefault(r.patient_id, []).append(r)
    jobs = []
    for pid, prow in patients.items():
        name = pseudonym(pid, key)
        mask = cohort / MASKS_DIR / f"{pid}.nii.gz" if masks is None else masks / f"{name}.nii.gz"
        if masks is None and not mask.exists() and not mask.is_symlink() and (cohort / MASKS_DIR / pid).is_dir():
            mask = cohort / MASKS_DIR / pid
        broken = mask.is_symlink() and not mask.exists()  # a dangling or looping link: a data problem, not "no mask"
        mask = mask if mask.is_file() or mask.is_dir() else None
        series = by_patient.get(pid, [])
        jobs.append(
            {
                "pseudonym": name,
                "hash": _patient_hash(prow, series, mask, settings + ("|broken mask link" if broken else "")),
                "broken_mask": broken,
                "rows": prow,
                "series": series,
                "mask": mask,
                "roi": roi,
                "checks": checks,
                "out": str(out),
                "cohort": str(cohort),
            }
        )
    return jobs


def ingest(
    cohort: str | Path,
    cache_root: str | Path,
    roi: RoiSpec,
    key_file: str | Path | None = None,
    num_workers: int = 1,
    progress: bool = True,
    checks: IngestChecks | dict | None = None,
    masks: str | Path | None = None,
) -> Path:
    """Ingests `cohort` (or reuses its fresh cache) and returns the cache folder.

    `masks`: a folder of predicted masks (`<pseudonym>.nii.gz` on the CT's voxels, from `ovcf.segment`) to cut the
    ROIs from instead of the cohort's own masks; it gets a cache of its own.

    The folder holds `index.csv` (one line per clinical row, pseudonymised, with `included`,
    exclusion `reasons` and reader `flags`), `samples/<pseudonym>.npz` (ROI image in HU and body
    mask per row), `patients/<pseudonym>.json` (rows and series report) and the flow report
    (`flow.json`, `flow.md`, `flow.png`). `index.csv`'s `signs` (the CSV's optional column; `?`: no sign
    labels) is always taken from the CSV as it is now, so adding the column re-indexes without re-ingesting.
    """
    checks = checks if isinstance(checks, IngestChecks) else IngestChecks.from_config(checks)
    cohort = check_cohort(Path(cohort))
    if masks is not None:
        masks = Path(masks).expanduser().resolve()
        if not masks.is_dir():
            raise CohortError(f"predicted masks folder {masks} does not exist; write it with python -m ovcf.segment ckpt=...")
    out = cache_folder(cohort, Path(cache_root), roi, masks)
    with exclusive(out):  # runs started side by side: one ingests, the others wait and reuse the cache
        key = load_key(key_file, cache_root)
        settings = json.dumps([asdict(roi), asdict(checks), CACHE_VERSION, hashlib.sha256(key).hexdigest(), str(masks)])
        fingerprint, broken_masks = _fingerprint(cohort, f"{settings}|index {INDEX_VERSION}")
        stamp = out / "fingerprint.json"
        if cache_fingerprint(out) == fingerprint:
            return out

        rows = read_clinical(cohort / CLINICAL_CSV)
        check_one_center(rows, key)
        for sub in ("samples", "patients"):
            (out / sub).mkdir(parents=True, exist_ok=True)
        with worker_pool(num_workers) as pool:  # workers start once for both passes
            scan = scan_folder(cohort / DICOM_DIR, num_workers, progress, pool)
            records, jobs = {}, []
            for job in _jobs(cohort, rows, scan.by_patient(), key, settings, roi, checks, out, masks):
                done = out / "patients" / f"{job['pseudonym']}.json"
                record = json.loads(done.read_text()) if done.exists() else {}
                if record.get("hash") == job["hash"]:
                    records[job["pseudonym"]] = record
                else:
                    (out / "samples" / f"{job['pseudonym']}.npz").unlink(missing_ok=True)
                    jobs.append(job)
            if jobs:
                for record in pool_map(_ingest_patient, jobs, num_workers, f"Ingesting {len(jobs)} patients", progress, pool):
                    records[record["rows"][0]["pseudonym"]] = record
        for stale in (out / "patients").glob("*.json"):  # patients no longer in the cohort
            if stale.stem not in records:
                stale.unlink()
                (out / "samples" / f"{stale.stem}.npz").unlink(missing_ok=True)
        signs = {r.row: r.signs for r in rows}  # from the CSV as it is now: a reused record may predate the column
        index = sorted(
            (r | {"signs": signs.get(r["row"])} for rec in records.values() for r in rec["rows"]), key=lambda r: r["row"]
        )
        _write_index(out / "index.csv", index)
        rejected = Counter(
            s["status"] for rec in records.values() for s in rec["series"] if s["status"] not in (USED, NOT_CANDIDATE, UNUSED)
        )
        totals = {
            "files": len(scan.files),
            **{kind: scan.kinds.get(kind, 0) for kind in FILE_KINDS},
            "broken_link": scan.kinds.get("broken_link", 0) + broken_masks,
            "series": len(scan.series),
            "series_rejected": dict(sorted(rejected.items())),
            "patients_reused": len(records) - len(jobs),
            "patients_ingested": len(jobs),
        }
        write_flow(out, index, totals)  # no title naming the cohort folder: exports are often named after a patient
        if all(rec["hash"] is not None for rec in records.values()):  # else: retry the failed patients next time
            write_json(stamp, {"fingerprint": fingerprint, "roi": asdict(roi), "version": CACHE_VERSION})
        else:
            stamp.unlink(missing_ok=True)
        return out


def _write_index(path: Path, index: list[dict]) -> None:
    rows = (
        {
            **r,
            "age": "" if r["age"] is None else r["age"],
            "dxa_t_score": "" if r["dxa_t_score"] is None else r["dxa_t_score"],
            "reasons": ";".join(r["reasons"]),
            "flags": ";".join(r["flags"]),
            SIGNS_COLUMN: SIGNS_UNKNOWN if r.get("signs") is None else ";".join(r["signs"]),
        }
        for r in index
    )
    write_csv(path, rows, INDEX_COLUMNS, extrasaction="ignore")


def read_index(cache: Path) -> list[dict]:
    """The rows of `index.csv`, typed."""
    with open(Path(cache) / "index.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    for r in rows:
        r["row"] = int(r["row"])
        r["included"] = r["included"] == "True"
        r["age"] = float(r["age"]) if r["age"] else float("nan")
        r["dxa_t_score"] = float(r["dxa_t_score"]) if r["dxa_t_score"] else float("nan")
        r["reasons"] = [x for x in r["reasons"].split(";") if x]
        r["flags"] = [x for x in r["flags"].split(";") if x]
        cell = r.get(SIGNS_COLUMN, SIGNS_UNKNOWN)  # an index written before the column: no sign labels
        r["signs"] = None if cell == SIGNS_UNKNOWN else [x for x in cell.split(";") if x]
    return rows
