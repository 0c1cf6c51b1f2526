"""No PHI leaves the ingest step: every byte the pipeline writes is searched for planted identifiers.

PHI is planted in every DICOM file (name, birth date, accession number, institution, physicians,
address, the patient ID itself), in the CSV (the IDs plus extra name and birth-date columns), in
the mask file names and in the export's folder names (`conftest.plant_phi`). The session's study
(`ovcf.study` on that cohort: segmenter sweep, predicted masks, classifier sweep with the W&B logger
offline, `ovcf.evaluate` with Grad-CAM and its W&B run, the exported system) and `ovcf.ingest` ran on
it, and `ovcf.predict` with a DICOM SEG and SR (`seg_mode=research`) on one patient; every file they
wrote (cache, logs, checkpoints, W&B runs, reports, plots, the SEG and SR) and their console output must
be free of it, file names included, and neither the SEG nor the SR holds a UID of the source DICOM.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from conftest import compose_cfg, run_cli


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


def test_no_phi_in_anything_the_pipeline_writes(smoke_study, phi_cohort, tmp_path, capsys):
    from ovcf.predict import run as predict_run

    cohort, secrets = phi_cohort
    planted = {leak.split(" in")[0] for leak in _leaks(cohort, secrets)}
    assert planted == set(secrets), "the search finds every planted value in the export itself"
    env, study = smoke_study.env, smoke_study.folder
    ingest = run_cli(
        "ovcf.ingest", [f"cohort={cohort}", "val_fraction=0.5", "progress=false", f"paths.log_dir={tmp_path}"], env, tmp_path
    )
    assert ingest.returncode == 0, ingest.stderr[-3000:]
    assert "flow.md" in ingest.stdout and "splits.json" in ingest.stdout and "included" in ingest.stdout
    patient = sorted(p for p in (cohort / "dicom").iterdir() if p.is_dir())[0]  # predict, with a DICOM SEG and SR (research)
    options = [f"input={patient}", f"output={tmp_path / 'predicted'}", f"system={study / 'system'}", "dicom_sr=true"]
    predict_run(compose_cfg("predict", [*options, "progress=false", f"paths.key_file={tmp_path / 'key'}"]))
    predicted = capsys.readouterr()
    (seg,), (sr,) = (tmp_path / "predicted").rglob("seg.dcm"), (tmp_path / "predicted").rglob("sr.dcm")
    for written in (seg, sr):
        assert [uid for uid in _source_values(patient)["uids"] if uid.encode() in written.read_bytes()] == []
    cache = env["OVCF_CACHE_DIR"]
    assert any(study.rglob("*.ckpt")) and any(smoke_study.root.rglob("*.wandb")), "checkpoints and W&B runs"
    assert any((study / "evaluation" / "gradcam").rglob("*.png")) and (study / "system" / "configs" / "metadata.json").is_file()
    assert _leaks(smoke_study.root, secrets) == []
    assert _leaks(cache, secrets) == [] and _leaks(tmp_path, secrets) == []
    console = (smoke_study.output + ingest.stdout + ingest.stderr + predicted.out + predicted.err).lower()
    assert [what for what, value in secrets.items() if value.lower() in console] == []


def test_the_default_key_lives_outside_the_cache(monkeypatch, tmp_path):
    """The key that makes pseudonyms defaults to the user's config folder, never the cache it protects."""
    monkeypatch.delenv("OVCF_KEY_FILE", raising=False)
    monkeypatch.delenv("OVCF_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    paths = compose_cfg("train").paths
    key, cache = Path(paths.key_file).expanduser().resolve(), Path(paths.cache_dir).expanduser().resolve()
    assert key == tmp_path / "config" / "ovcf" / "pseudonym.key" and not key.is_relative_to(cache)
    monkeypatch.delenv("XDG_CONFIG_HOME")
    assert Path(compose_cfg("train").paths.key_file).expanduser() == Path.home() / ".config" / "ovcf" / "pseudonym.key"
    monkeypatch.setenv("OVCF_KEY_FILE", str(tmp_path / "elsewhere.key"))
    assert compose_cfg("train").paths.key_file == str(tmp_path / "elsewhere.key")


def test_a_key_inside_the_cache_is_refused(tiny_cohort, tmp_path, monkeypatch):
    from ovcf.data.ingest import ingest
    from ovcf.data.roi import RoiSpec
    from ovcf.errors import ConfigError

    monkeypatch.delenv("OVCF_PSEUDONYM_KEY", raising=False)
    cache = tmp_path / "cache"
    with pytest.raises(ConfigError) as refused:
        ingest(tiny_cohort, cache, RoiSpec(24, 2.0), cache / "keys" / "pseudonym.key", progress=False)
    message = str(refused.value)
    assert "paths.key_file" in message and "cache" in message and "\n" not in message
    assert not (cache / "keys" / "pseudonym.key").exists(), "no key is written into the cache"


def test_the_flow_report_names_no_input_folder(tiny_cohort, tmp_path):
    """A cohort folder named after a patient (as PACS exports often are) appears in no report ingest writes."""
    from ovcf.data.ingest import ingest
    from ovcf.data.roi import RoiSpec

    folder = "MRNPHI5521_ZYXWVUTPHI^QWERTYPHI"
    cohort = tmp_path / folder
    (cohort / "dicom").mkdir(parents=True)  # no images: every row is excluded, which is quick
    shutil.copy(tiny_cohort / "clinical.csv", cohort / "clinical.csv")
    cache = ingest(cohort, tmp_path / "cache", RoiSpec(24, 2.0), tmp_path / "key", progress=False)
    assert (cache / "flow.md").read_text().startswith("# Cohort flow\n")
    assert _leaks(tmp_path / "cache", {"folder": folder, "patient": "MRNPHI5521", "name": "ZYXWVUTPHI"}) == []


STANDARD_UID = "1.2.840.10008."  # DICOM's own UIDs (SOP classes, transfer syntaxes): they name no patient or study


def _source_values(folder: Path) -> dict[str, set[str]]:
    """Every UID (but DICOM's own) and every date of the DICOM files under `folder`, and their identity tags."""
    import pydicom

    found: dict[str, set[str]] = {"uids": set(), "dates": set()}
    for path in (p for p in folder.rglob("*") if p.is_file()):
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
        except pydicom.errors.InvalidDicomError:
            continue
        for element in ds.iterall():
            values = element.value if element.VM > 1 else [element.value]
            if element.VR == "UI":
                found["uids"] |= {str(v) for v in values if v and not str(v).startswith(STANDARD_UID)}
            elif element.VR in ("DA", "DT") and element.keyword != "PatientBirthDate":  # birth dates: SECRETS
                found["dates"] |= {str(v) for v in values if v}
    return found


@pytest.fixture(scope="module")
def ct_to_segment(phi_cohort, tmp_path_factory):
    """One patient of the PHI-planted cohort, with its scanner's serial number and station name planted too: its CT
    chosen as predict chooses it, and a mask of L1 on its voxels."""
    import numpy as np
    import pydicom

    from ovcf.contract import LEVEL_IDS
    from ovcf.data.ct import IngestChecks, find_cases, load_case

    cohort, secrets = phi_cohort
    source = sorted(p for p in (cohort / "dicom").iterdir() if p.is_dir())[0]
    folder = shutil.copytree(source, tmp_path_factory.mktemp("seg") / "patient")
    secrets = {**secrets, "device serial": "SNPHI40417", "station": "STATIONPHI7"}
    for path in (p for p in folder.rglob("*") if p.is_file()):
        try:
            ds = pydicom.dcmread(path)
        except pydicom.errors.InvalidDicomError:
            continue
        ds.DeviceSerialNumber, ds.StationName = secrets["device serial"], secrets["station"]
        ds.save_as(path)
    (case,) = find_cases(folder, progress=False)
    choice = load_case(case, IngestChecks(), "pseudo1234")
    labels = np.zeros(choice.volume.array.shape, np.uint8)
    k = labels.shape[2] // 2
    labels[10:20, 12:22, k - 2 : k + 2] = LEVEL_IDS["L1"]
    return {"folder": folder, "case": case, "series": choice.series, "labels": labels, "secrets": secrets}


# One level as predict reports it (report.json's `levels`): what the SR writer reads.
L1_ENTRY = {
    "level": "L1",
    "status": "classified",
    "probability": 0.8125,
    "decision": "acute",
    "heights": {"anterior_mm": 14.2, "middle_mm": 19.5, "posterior_mm": 24.0, "anterior_ratio": 0.592,
                "middle_ratio": 0.813, "neighbour_ratio": None, "height_loss": 0.408, "genant_grade": 3, "cut": False},
}  # fmt: skip


def _write_dicom(ct: dict, folder: Path, mode: str) -> dict:
    """The SEG and SR predict writes for `ct` under `mode`, read back with pydicom (by report.json's file key)."""
    from types import SimpleNamespace

    import pydicom

    from ovcf.data.ct import IngestChecks
    from ovcf.inference.dicom import write_dicom

    system = SimpleNamespace(checks=IngestChecks(), meta={"version": "0.0-test"}, threshold=0.5)  # what the writers read
    files = write_dicom(folder, ct["series"], ct["labels"], "pseudo1234", system, mode, levels=[L1_ENTRY])
    return {key: pydicom.dcmread(folder / name) for key, name in files.items()}


def test_a_research_seg_and_sr_carry_nothing_of_the_source(ct_to_segment, tmp_path):
    """The default SEG and SR: new study, series, instance and frame-of-reference UIDs, the pseudonym, no source date."""
    import highdicom as hd

    from ovcf.inference.dicom import segment_numbers

    written = _write_dicom(ct_to_segment, tmp_path, "research")
    seg, sr = written["dicom_seg"], written["dicom_sr"]
    source = _source_values(ct_to_segment["folder"])
    assert source["uids"] and source["dates"], "the search has something to look for"
    for name in ("seg.dcm", "sr.dcm"):
        blob = (tmp_path / name).read_bytes()
        assert [uid for uid in source["uids"] if uid.encode() in blob] == [], name
        assert [date for date in source["dates"] if date.encode() in blob] == [], name
    assert _leaks(tmp_path, ct_to_segment["secrets"]) == []
    for ds in (seg, sr):  # the SR takes patient and study from the same cleaned headers as the SEG
        assert ds.PatientID == "pseudo1234" and ds.PatientName == "pseudo1234^" and not ds.get("PatientSex")
        assert not ds.get("StudyDate") and not ds.get("AccessionNumber") and "research" in ds.SeriesDescription
        assert ds.StudyInstanceUID == seg.StudyInstanceUID and not ds.get("InstitutionName")
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID not in source["uids"]
    frames = hd.seg.segread(tmp_path / "seg.dcm")
    assert frames.SegmentationType == "LABELMAP" and segment_numbers(frames) == {"L1": 1} and frames.NumberOfFrames == 4


def test_a_pacs_seg_and_sr_file_with_their_ct(ct_to_segment, tmp_path):
    """seg_mode=pacs: the patient's identity and the source study, frame of reference and series, for a PACS."""
    import highdicom as hd
    import pydicom

    written = _write_dicom(ct_to_segment, tmp_path, "pacs")
    seg, sr = written["dicom_seg"], written["dicom_sr"]
    ct = pydicom.dcmread(ct_to_segment["series"].slices[0].path, stop_before_pixels=True)
    assert seg.PatientID == ct.PatientID and ct.PatientID in ct_to_segment["secrets"].values()
    identity = ("PatientID", "PatientName", "PatientBirthDate", "PatientSex", "StudyInstanceUID")
    for ds in (seg, sr):  # the SR takes patient and study from the same headers as the SEG
        assert [ds.get(k) for k in identity] == [ct.get(k) for k in identity] and "pacs" in ds.SeriesDescription
    assert seg.FrameOfReferenceUID == ct.FrameOfReferenceUID
    (referenced,) = seg.ReferencedSeriesSequence
    assert referenced.SeriesInstanceUID == ct.SeriesInstanceUID
    sources = {s.sop_uid for s in ct_to_segment["series"].slices}
    assert {i.ReferencedSOPInstanceUID for i in referenced.ReferencedInstanceSequence} <= sources
    (evidence,) = sr.CurrentRequestedProcedureEvidenceSequence  # the CT's slices and the SEG, all in the CT's study
    series = {
        s.SeriesInstanceUID: {i.ReferencedSOPInstanceUID for i in s.ReferencedSOPSequence}
        for s in evidence.ReferencedSeriesSequence
    }
    assert series == {ct.SeriesInstanceUID: sources, seg.SeriesInstanceUID: {seg.SOPInstanceUID}}
    (group,) = hd.sr.srread(tmp_path / "sr.dcm").content.get_volumetric_roi_measurement_groups()  # L1, on the CT
    assert group.referenced_segment.referenced_segment_numbers == [1]
    assert group.referenced_segment.source_series_for_segmentation.value == ct.SeriesInstanceUID
    assert {q.name.value: q.value.value for q in group.get_qualitative_evaluations()} == {"ACUITY": "ACUTE", "GENANT": "GENANT3"}
