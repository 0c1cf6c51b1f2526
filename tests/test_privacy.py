"""No PHI leaves the ingest step: every byte the pipeline writes is searched for planted identifiers.

PHI is planted in every DICOM file (name, birth date, accession number, institution, physicians,
address, the patient ID itself), in the CSV (the IDs plus extra name and birth-date columns), in
the mask file names and in the export's folder names (`conftest.plant_phi`). The session's study
(`ovcf.study` on that cohort: segmenter sweep, predicted masks, classifier sweep with the W&B logger
offline, `ovcf.evaluate` with Grad-CAM and its W&B run, the exported system) and `ovcf.ingest` ran on
it; every file they wrote (cache, logs, checkpoints, W&B runs, reports, plots) and their console
output must be free of it, file names included.
"""

from __future__ import annotations

import os

import pytest
from conftest import run_cli


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


@pytest.mark.xdist_group("study")  # reads the session's smoke study: same xdist worker
def test_no_phi_in_anything_the_pipeline_writes(smoke_study, phi_cohort, tmp_path):
    cohort, secrets = phi_cohort
    planted = {leak.split(" in")[0] for leak in _leaks(cohort, secrets)}
    assert planted == set(secrets), "the search finds every planted value in the export itself"
    env, study = smoke_study.env, smoke_study.folder
    ingest = run_cli(
        "ovcf.ingest", [f"cohort={cohort}", "val_fraction=0.5", "progress=false", f"paths.log_dir={tmp_path}"], env, tmp_path
    )
    assert ingest.returncode == 0, ingest.stderr[-3000:]
    assert "flow.md" in ingest.stdout and "splits.json" in ingest.stdout and "included" in ingest.stdout
    cache = env["OVCF_CACHE_DIR"]
    assert any(study.rglob("*.ckpt")) and any(smoke_study.root.rglob("*.wandb")), "checkpoints and W&B runs"
    assert any((study / "evaluation" / "gradcam").rglob("*.png")) and (study / "system" / "configs" / "metadata.json").is_file()
    assert _leaks(smoke_study.root, secrets) == []
    assert _leaks(cache, secrets) == [] and _leaks(tmp_path, secrets) == []
    console = (smoke_study.output + ingest.stdout + ingest.stderr).lower()
    assert [what for what, value in secrets.items() if value.lower() in console] == []
