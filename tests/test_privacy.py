"""No PHI leaves the ingest step: every byte the pipeline writes is searched for planted identifiers.

PHI is planted in every DICOM file (name, birth date, accession number, institution, physicians,
address, the patient ID itself), in the CSV (the IDs plus extra name and birth-date columns), in
the mask file names and in the export's folder names. Then `ovcf.ingest`, a short `ovcf.train` with the W&B logger (offline)
and `ovcf.evaluate` (predictions, figures, Grad-CAM, its offline W&B run) run, and every file they
wrote (cache, logs, checkpoints, W&B runs, reports, plots) and their console output must be free
of it, file names included.
"""

from __future__ import annotations

import csv
import os
import shutil

import pydicom
from conftest import run_cli

NAME = ("ZYXWVUTPHI", "QWERTYPHI")
BIRTH = "19230405"
SECRETS = {
    "name": NAME[0],
    "given name": NAME[1],
    "birth date": BIRTH,
    "birth date (ISO)": "1923-04-05",
    "accession": "ACCPHI99117",
    "institution": "PHIVILLE XQ HOSPITAL",
    "physician": "DRPHIDOCTOR",
    "address": "12 PHILANE",
}


def _plant(src, dst) -> dict[str, str]:
    """Copies the cohort with distinctive identifiers; returns old -> new patient IDs."""
    shutil.copytree(src, dst)
    with open(dst / "clinical.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    ids = {old: f"MRNPHI{7731 + i}" for i, old in enumerate(dict.fromkeys(r["patient_id"] for r in rows))}
    for r in rows:
        r["patient_id"] = ids[r["patient_id"]]
        r["patient_name"] = f"{NAME[0]}^{NAME[1]}"
        r["birth_date"] = "1923-04-05"
    with open(dst / "clinical.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    for old, new in ids.items():
        os.replace(dst / "masks" / f"{old}.nii.gz", dst / "masks" / f"{new}.nii.gz")
    for folder in sorted(p for p in (dst / "dicom").iterdir() if p.is_dir()):
        new_id = None
        for path in sorted(p for p in folder.rglob("*") if p.is_file()):
            ds = pydicom.dcmread(path)
            new_id = ids[str(ds.PatientID)]
            ds.PatientID = new_id
            ds.PatientName = f"{NAME[0]}^{NAME[1]}"
            ds.PatientBirthDate = BIRTH
            ds.AccessionNumber = SECRETS["accession"]
            ds.InstitutionName = SECRETS["institution"]
            ds.ReferringPhysicianName = ds.PerformingPhysicianName = SECRETS["physician"]
            ds.PatientAddress = SECRETS["address"]
            ds.save_as(path)
        os.replace(folder, folder.parent / f"{new_id}_{NAME[0]}")  # PACS folders named after the patient
    return ids


def _leaks(root, secrets: dict[str, str]) -> list[str]:
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            for what, value in secrets.items():
                if value.lower() in name.lower():
                    found.append(f"{what} in the name {os.path.join(dirpath, name)}")
        for name in filenames:
            blob = open(os.path.join(dirpath, name), "rb").read().lower()
            for what, value in secrets.items():
                if value.lower().encode() in blob or value.lower().encode("utf-16-le") in blob:
                    found.append(f"{what} inside {os.path.join(dirpath, name)}")
    return found


def test_no_phi_in_anything_the_pipeline_writes(tiny_cohort, tmp_path):
    cohort = tmp_path / "export"
    ids = _plant(tiny_cohort, cohort)
    secrets = {**SECRETS, **{f"patient ID {i}": new for i, new in enumerate(ids.values())}}
    planted = {leak.split(" in")[0] for leak in _leaks(cohort, secrets)}
    assert planted == set(secrets), "the search finds every planted value in the export itself"
    written = tmp_path / "written"
    env = {
        **os.environ,
        "WANDB_MODE": "offline",
        "WANDB_DIR": str(written / "wandb"),
        "OVCF_CACHE_DIR": str(written / "cache"),
        "OVCF_DATA_DIR": str(written / "data"),
        "PYTHONUNBUFFERED": "1",
    }
    common = [f"paths.log_dir={written / 'logs'}"]
    ingest = run_cli("ovcf.ingest", [f"cohort={cohort}", "val_fraction=0.5", "progress=false", *common], env, tmp_path)
    assert ingest.returncode == 0, ingest.stderr[-3000:]
    assert "flow.md" in ingest.stdout and "splits.json" in ingest.stdout and "included" in ingest.stdout
    train = run_cli(
        "ovcf.train",
        ["debug=smoke", "logger=wandb", f"data.cohort={cohort}", "data.val_fraction=0.5", "data.progress=false", *common],
        env,
        tmp_path,
    )
    assert train.returncode == 0, train.stderr[-3000:]
    assert any((written / "logs").rglob("*.ckpt")) and any((written / "logs").rglob("*.wandb")), "checkpoints and a W&B run"
    assert any((written / "cache").rglob("flow.png")) and any((written / "cache").rglob("splits.json"))
    run = next((written / "logs").rglob("results.json")).parent
    evaluate = run_cli(
        "ovcf.evaluate",
        [f"run={run}", f"out={written / 'evaluation'}", "threshold.rule=fixed", "gradcam_cases=1", "progress=false", *common],
        env,
        tmp_path,
    )
    assert evaluate.returncode == 0, evaluate.stderr[-3000:]
    assert any((written / "evaluation" / "gradcam").rglob("*.png")) and any((written / "evaluation").rglob("*.wandb"))
    assert _leaks(written, secrets) == []
    console = (ingest.stdout + ingest.stderr + train.stdout + train.stderr + evaluate.stdout + evaluate.stderr).lower()
    assert [what for what, value in secrets.items() if value.lower() in console] == []
