"""The exported system and `ovcf.predict`: export round trip, prediction on DICOM, refusals, privacy.

One module fixture builds the cheapest real system: a smoke-trained U-Net segmenter on the tiny
cohort next to `tiny_sweep`'s DenseNet-121 (same cache), exported with `export_system`. The models
are untrained; the plumbing (ingest's validation, ROI, threshold, outputs, privacy) is under test.
"""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from conftest import check_heights_flag_fractures, compose_cfg

from ovcf.contract import LEVEL_IDS
from ovcf.errors import ConfigError


# The system under test is the one `python -m ovcf.study` exported (conftest's session fixture
# `smoke_study`, on the PHI-planted tiny cohort), so this module trains nothing of its own.
@pytest.fixture(scope="module")
def system(smoke_study) -> dict:
    """The study's exported system, the runs it was made from, evaluate's folder and the planted PHI."""
    chosen = json.loads((smoke_study.folder / "study.json").read_text())["chosen"]
    return {
        "folder": smoke_study.folder / "system",
        "run": Path(chosen["classifier"]["run"]),
        "seg": Path(chosen["segmenter"]["checkpoint"]),
        "eval": smoke_study.folder / "evaluation",
        "secrets": smoke_study.secrets,
    }


@pytest.fixture(scope="module")
def two_patients(phi_cohort, tmp_path_factory) -> dict[str, Path]:
    """Two patients of the PHI-planted cohort as one export (folders named after them); every CT series of the
    second misses three slices in its middle, which ingest rejects as missing_slices. Returns patient ID -> folder."""
    export = tmp_path_factory.mktemp("two") / "export"
    found = {}
    for i, folder in enumerate(sorted(p for p in (phi_cohort[0] / "dicom").iterdir() if p.is_dir())[:2]):
        target = shutil.copytree(folder, export / folder.name)
        series: dict[str, list] = {}
        for path in sorted(p for p in target.rglob("*") if p.is_file()):
            try:
                ds = pydicom.dcmread(path, stop_before_pixels=True)
            except pydicom.errors.InvalidDicomError:
                continue
            found[str(ds.PatientID)] = target
            if ds.Modality == "CT" and "LOCALIZER" not in ds.ImageType:
                series.setdefault(ds.SeriesInstanceUID, []).append((float(ds.ImagePositionPatient[2]), path))
        for slices in series.values() if i == 1 else []:  # the thin series and its thick recon: no fallback left
            for _, path in sorted(slices)[len(slices) // 2 : len(slices) // 2 + 3]:
                path.unlink()
    return found


def test_heights_flag_the_fractured_levels(tiny_cohort):
    """On the cohort's own masks, `levels=auto` (Genant grade >= 1) picks every fractured body, and no
    other beyond one slice's rounding on thick slices (`check_heights_flag_fractures`)."""
    from ovcf.data.heights import genant_grade

    assert [genant_grade(x) for x in (0.1, 0.2, 0.3, 0.45)] == [0, 1, 2, 3]
    for p in json.loads((tiny_cohort / "synth.json").read_text())["patients"]:
        fractured = {f["level"] for f in p["fractures"]}
        heights = check_heights_flag_fractures(tiny_cohort / "masks" / f"{p['patient_id']}.nii.gz", fractured)
        for level in fractured:  # all flagged (checked above)
            h = heights[level]
            assert h["height_loss"] >= 0.2 and 0 < h["anterior_ratio"] and h["anterior_mm"] > 5


def test_export_round_trip(system, tmp_path):
    """The folder loads on its own (moved away from its runs); metadata has the bundle keys; the threshold is evaluate's."""
    from ovcf.eval.external import Scoring, evaluate_predictions
    from ovcf.inference.runs import run_predictions
    from ovcf.inference.system import export_system, load_system

    moved = shutil.copytree(system["folder"], tmp_path / "elsewhere" / "system")
    meta = json.loads((moved / "configs" / "metadata.json").read_text())
    keys = {"version", "changelog", "monai_version", "pytorch_version", "numpy_version", "optional_packages_version", "task"}
    keys |= {"description", "authors", "copyright", "data_source", "network_data_format", "models", "threshold"}
    keys |= {"threshold_rule", "validation_metrics", "data_hash"}
    assert keys <= set(meta) and {"inputs", "outputs"} <= set(meta["network_data_format"])
    loaded = load_system(moved)
    size = loaded.pre["roi_size"]
    assert meta["network_data_format"]["inputs"]["image"]["spatial_shape"] == [size] * 3 and loaded.classifiers
    assert loaded.pre["volume_spacing"] == 2.0 and loaded.checks.series.min_slices == 3
    # evaluate froze the threshold (and chose the model) in the study's evaluation/metrics.json
    report = json.loads((system["eval"] / "metrics.json").read_text())
    entry = next(m for m in report["models"].values() if Path(m["run"]).resolve() == system["run"].resolve())
    assert loaded.threshold == meta["threshold"] == entry["threshold"]["value"]
    assert meta["validation_metrics"]["n"] == entry["val"]["n"]
    # Without evaluation=, the threshold is chosen from the run's validation predictions as evaluate does.
    again = export_system(system["run"], system["seg"], tmp_path / "again", rule="youden")
    preds = run_predictions(system["run"], progress=False)
    expected = evaluate_predictions(preds["val"], preds["test"], Scoring("youden"))["threshold"]["value"]
    assert json.loads((again / "configs" / "metadata.json").read_text())["threshold"] == expected
    other = shutil.copytree(system["run"], tmp_path / "other_run")  # a run that evaluation did not score
    with pytest.raises(ConfigError, match="holds no model of classifier"):
        export_system(other, system["seg"], tmp_path / "x", system["eval"])


def _headers(folder: Path):
    """The DICOM headers of the files under `folder`."""
    for path in (p for p in folder.rglob("*") if p.is_file()):
        try:
            yield pydicom.dcmread(path, stop_before_pixels=True)
        except pydicom.errors.InvalidDicomError:
            continue


def _bodies(labels: np.ndarray, affine: np.ndarray, values: dict[str, int]) -> dict[str, tuple[int, np.ndarray]]:
    """Each level's voxel count and centre (mm, in the frame of `affine`) in a label map holding it as `values[level]`."""
    found = {}
    for level, value in values.items():
        voxels = np.argwhere(labels == value)
        found[level] = (len(voxels), (affine @ np.append(voxels.mean(0), 1))[:3])
    return found


def _sr_groups(path: Path) -> dict:
    """The SR's measurement groups by tracking identifier (the level), read back with highdicom."""
    import highdicom as hd

    sr = hd.sr.srread(path)
    return {g.tracking_identifier: g for g in sr.content.get_volumetric_roi_measurement_groups()}


def _check_sr(path: Path, report: dict, seg) -> None:
    """The SR holds one group per body of the SEG: for a level predict reported, report.json's own probability,
    decision, heights and Genant grade; for any other body, its heights and grade. Each group references its SEG
    segment and the CT series the SEG lies on."""
    from ovcf.inference.dicom import DECISION, GENANT, MEASURED, PROBABILITY, segment_numbers

    sr = pydicom.dcmread(path)
    assert sr.SOPClassUID == pydicom.uid.Comprehensive3DSRStorage and sr.PatientID == seg.PatientID
    assert sr.StudyInstanceUID == seg.StudyInstanceUID and sr.SeriesInstanceUID != seg.SeriesInstanceUID
    evidence = {s.SeriesInstanceUID for e in sr.CurrentRequestedProcedureEvidenceSequence for s in e.ReferencedSeriesSequence}
    ct_series = seg.ReferencedSeriesSequence[0].SeriesInstanceUID
    assert evidence == {ct_series, seg.SeriesInstanceUID}
    groups, numbers = _sr_groups(path), segment_numbers(seg)
    assert list(groups) == list(numbers) == list(report["segmentation"]["heights"])  # every body, up the spine's ids
    reported = {e["level"]: e for e in report["levels"]}
    for level, heights in report["segmentation"]["heights"].items():
        group, e = groups[level], reported.get(level, {})
        found = {m.name.value: m.value for m in group.get_measurements()}
        assert found.pop(PROBABILITY.value, None) == e.get("probability")  # the very float of report.json
        for key, (code, _) in MEASURED.items():
            value = found.pop(code.value, None)
            assert value is None if heights[key] is None else value == pytest.approx(heights[key], abs=0.01), key
        assert found == {}
        calls = {q.name.value: q.value.value for q in group.get_qualitative_evaluations()}
        expected = {DECISION.value: e["decision"].upper()} if "decision" in e else {}
        if heights["genant_grade"] is not None:  # None: a body cut by the scan is not graded
            expected[GENANT.value] = f"GENANT{heights['genant_grade']}"
        assert calls == expected
        segment = group.referenced_segment
        assert segment.referenced_sop_instance_uid == seg.SOPInstanceUID
        assert segment.referenced_segment_numbers == [numbers[level]]
        assert segment.source_series_for_segmentation.value == ct_series


def _ct_series_uids(folder: Path) -> set[str]:
    return {
        str(ds.SeriesInstanceUID)
        for ds in _headers(folder)
        if ds.get("Modality") == "CT" and "LOCALIZER" not in ds.get("ImageType", [])
    }


def _leaks(root: Path, secrets: dict[str, str], text: str = "") -> list[str]:
    """Where any planted PHI value appears: in `text`, in a file or folder name under `root`, or inside a file."""
    found = [f"{what} in console" for what, v in secrets.items() if v.lower() in text.lower()]
    for path in root.rglob("*"):
        found += [f"{what} in name {path}" for what, v in secrets.items() if v.lower() in path.name.lower()]
        if path.is_file():
            blob = path.read_bytes().lower()
            found += [f"{what} in {path}" for what, v in secrets.items() if v.lower().encode() in blob]
    return found


def test_predict_on_a_dicom_export(system, two_patients, tmp_path, capsys):
    """An export of several patients: report, PNGs, NIfTI, DICOM SEG and SR for the good one, the bad one refused,
    no PHI. The SEG is a LABELMAP with one segment per level of the NIfTI mask; the SR holds predict's own results."""
    import highdicom as hd

    from ovcf.data.ct import IngestChecks, read_ct
    from ovcf.data.pseudonym import load_key, pseudonym
    from ovcf.inference.dicom import segment_numbers
    from ovcf.predict import run as predict_run

    out = tmp_path / "out"
    export = next(iter(two_patients.values())).parent
    key = load_key(tmp_path / "key")
    by_name = {pseudonym(pid, key): folder for pid, folder in two_patients.items()}
    cfg = compose_cfg(
        "predict",
        [
            f"input={export}",
            f"output={out}",
            f"system={system['folder']}",
            "levels=all",
            "nifti=true",
            "dicom_seg=true",
            "dicom_sr=true",
            "progress=false",
            f"paths.key_file={tmp_path / 'key'}",
        ],
    )
    summary = predict_run(cfg)
    console = capsys.readouterr()
    assert len(summary["patients"]) == 1 and len(summary["refused"]) == 1
    (refused,) = summary["refused"].values()
    assert "missing_slices" in refused and "CT series #2" in refused and "\n" not in refused
    assert refused in console.err and " s\n" in console.out  # the refusal and the per-patient time are printed
    assert "seg.dcm and sr.dcm written" in console.out
    threshold = json.loads((system["folder"] / "configs" / "metadata.json").read_text())["threshold"]
    folders = {p.name: p for p in out.iterdir() if p.is_dir()}
    assert set(folders) == set(summary["patients"])
    for name in sorted(folders):
        report = json.loads((folders[name] / "report.json").read_text())
        assert report["segmentation"]["levels"], "the study's segmenter found no vertebral body"
        assert [e["level"] for e in report["levels"]] == report["segmentation"]["levels"] and report["seconds"] > 0
        for e in report["levels"]:
            assert e["status"] == "classified" and 0 <= e["probability"] <= 1
            assert e["decision"] == ("acute" if e["probability"] >= threshold else "chronic")
            assert (folders[name] / e["gradcam"]).stat().st_size > 5_000
        seg = hd.seg.segread(folders[name] / "seg.dcm")
        assert seg.PatientID == name and seg.PatientName == f"{name}^" and seg.SegmentationType == "LABELMAP"
        numbers = segment_numbers(seg)
        assert numbers and set(numbers) <= set(LEVEL_IDS) and report["files"]["dicom_sr"] == "sr.dcm"
        _check_sr(folders[name] / "sr.dcm", report, seg)
        ct_folder = by_name[name]  # seg_mode=research (the default): the SEG references no source series
        assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID not in _ct_series_uids(ct_folder)
        assert report["seg_mode"] == summary["seg_mode"] == "research" and "(research)" in seg.SeriesDescription
        ct = read_ct(ct_folder, IngestChecks()).volume.canonical()
        mask = nib.load(folders[name] / "mask.nii.gz")
        assert mask.shape == ct.array.shape and np.allclose(mask.affine, ct.affine, atol=1e-3)
        assert set(np.unique(np.asarray(mask.dataobj))) - {0} <= set(LEVEL_IDS.values())
        stored = seg.get_volume(combine_segments=True)  # LPS; the SEG lies on the source grid, the NIfTI on RAS
        in_seg = _bodies(stored.array, np.diag([-1, -1, 1, 1]) @ stored.affine, numbers)
        in_nifti = _bodies(np.asarray(mask.dataobj), mask.affine, {lv: LEVEL_IDS[lv] for lv in numbers})
        for level, (count, centre) in in_seg.items():  # nearest-neighbour ties may fall apart on the two grids
            assert count == pytest.approx(in_nifti[level][0], rel=0.05) and np.linalg.norm(centre - in_nifti[level][1]) < 1, level
    assert (out / "summary.csv").is_file()
    assert _leaks(out, system["secrets"], console.out + console.err) == []

    # A NIfTI CT, with named levels: one the mask holds, and one outside the scan.
    found = report["segmentation"]["levels"][0]
    nib.save(nib.Nifti1Image(ct.array, ct.affine), tmp_path / "ct.nii.gz")
    cfg = compose_cfg("predict", [f"input={tmp_path / 'ct.nii.gz'}", f"output={tmp_path / 'nii'}", f"system={system['folder']}"])
    cfg.levels, cfg.progress, cfg.paths.key_file = [found, "C1"], False, str(tmp_path / "key")
    (name,) = predict_run(cfg)["patients"]
    entries = json.loads((tmp_path / "nii" / name / "report.json").read_text())["levels"]
    assert [(e["level"], e["status"]) for e in entries] == [("C1", "not_in_fov"), (found, "classified")]


def test_predict_writes_a_pacs_seg_and_sr_on_request(system, two_patients, tmp_path):
    """seg_mode=pacs: the SEG and SR carry the patient's ID and the CT's study and series, so a PACS files them with
    the CT; `dicom_sr=true` alone writes the SEG it references too; `seg_type=binary`: the classic Segmentation SOP class."""
    from ovcf.predict import run as predict_run

    pid, folder = next(iter(two_patients.items()))
    out = tmp_path / "out"
    args = [f"input={folder}", f"output={out}", f"system={system['folder']}", "dicom_sr=true", "seg_mode=pacs"]  # levels=auto
    cfg = compose_cfg("predict", [*args, "seg_type=binary", "progress=false", f"paths.key_file={tmp_path / 'key'}"])
    summary = predict_run(cfg)
    (name,) = summary["patients"]
    seg = pydicom.dcmread(out / name / "seg.dcm")
    assert seg.SOPClassUID == pydicom.uid.SegmentationStorage and seg.SegmentationType == "BINARY"
    referenced = seg.ReferencedSeriesSequence[0].SeriesInstanceUID
    assert referenced in _ct_series_uids(folder)
    ct = next(ds for ds in _headers(folder) if ds.SeriesInstanceUID == referenced)
    assert seg.PatientID == pid and seg.StudyInstanceUID == ct.StudyInstanceUID
    report = json.loads((out / name / "report.json").read_text())
    assert summary["seg_mode"] == report["seg_mode"] == "pacs"
    _check_sr(out / name / "sr.dcm", report, seg)  # on the CT's own series
    for wrong, named in (
        ("seg_mode=hospital", "seg_mode=hospital: use research"),
        ("seg_type=rle", "seg_type=rle: use labelmap"),
    ):
        with pytest.raises(ConfigError, match=named):
            predict_run(compose_cfg("predict", [*args[:3], wrong]))


def test_a_rejected_series_is_refused_in_one_line(system, two_patients, tmp_path, capsys):
    """One patient whose CT ingest would reject: the entry point exits 2 with one line naming the series and reason."""
    from ovcf.cli import guarded
    from ovcf.predict import run as predict_run

    bad = list(two_patients.values())[1]
    cfg = compose_cfg("predict", [f"input={bad}", f"output={tmp_path / 'out'}", f"system={system['folder']}", "progress=false"])
    cfg.paths.key_file = str(tmp_path / "key")
    with pytest.raises(SystemExit) as exit_:
        guarded(predict_run, cfg)
    err = capsys.readouterr()
    lines = err.err.strip().splitlines()
    assert exit_.value.code == 2 and len(lines) == 1, err.err
    assert lines[0].startswith("error: p") and "missing_slices" in lines[0] and "CT series #2" in lines[0]
    assert _leaks(tmp_path / "out", system["secrets"], err.out + err.err) == []


def test_without_a_system_the_error_names_the_fix(tmp_path):
    from ovcf.errors import ConfigError
    from ovcf.predict import run as predict_run

    cfg = compose_cfg("predict", [f"input={tmp_path}", f"output={tmp_path / 'o'}", f"paths.log_dir={tmp_path / 'logs'}"])
    with pytest.raises(ConfigError, match=r"system=.*python -m ovcf\.study"):
        predict_run(cfg)
    cfg = compose_cfg("predict", [f"input={tmp_path}", f"output={tmp_path / 'o'}", "levels=[L9]"])
    with pytest.raises(ConfigError, match="unknown level"):
        predict_run(cfg)


@pytest.fixture(scope="module")
def fallback_export(tiny_cohort, tmp_path_factory) -> Path:
    """One patient as a cohort whose preferred CT series (the most slices) misses three slices, next to a
    valid second series (every other slice of it): every reader must fall back to the second one."""
    cohort = tmp_path_factory.mktemp("fallback") / "cohort"
    rows = list(csv.DictReader(open(tiny_cohort / "clinical.csv")))
    pid = rows[0]["patient_id"]
    slices = []
    for path in sorted(p for p in (tiny_cohort / "dicom").rglob("*") if p.is_file()):
        try:
            ds = pydicom.dcmread(path)
        except pydicom.errors.InvalidDicomError:
            continue
        if str(ds.PatientID) == pid and ds.Modality == "CT" and "LOCALIZER" not in ds.ImageType:
            slices.append(ds)
    by_series: dict[str, list] = {}
    for ds in slices:
        by_series.setdefault(str(ds.SeriesInstanceUID), []).append(ds)
    slices = sorted(max(by_series.values(), key=len), key=lambda ds: float(ds.ImagePositionPatient[2]))  # the thin one
    folder = cohort / "dicom" / "patient"
    folder.mkdir(parents=True)
    middle = len(slices) // 2
    for i, ds in enumerate(slices):
        if not middle <= i < middle + 3:
            ds.save_as(folder / f"thin_{i:04d}.dcm")
    thick = pydicom.uid.generate_uid()
    for i, ds in enumerate(slices[::2]):
        ds.SeriesInstanceUID, ds.SOPInstanceUID, ds.SeriesNumber = thick, pydicom.uid.generate_uid(), 9
        ds.save_as(folder / f"thick_{i:04d}.dcm")
    with open(cohort / "clinical.csv", "w", newline="") as fh:  # no mask: it was drawn on the thin series
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(r for r in rows if r["patient_id"] == pid)
    return cohort


def test_ingest_segment_and_predict_choose_the_same_series(system, fallback_export, tmp_path):
    """The one CT path: ingest, segment and predict reject the same broken series and use the same fallback."""
    from ovcf.data.ct import USED
    from ovcf.data.ingest import ingest
    from ovcf.data.roi import RoiSpec
    from ovcf.predict import run as predict_run
    from ovcf.segment import segment

    cache = ingest(fallback_export, tmp_path / "cache", RoiSpec(24, 2.0), tmp_path / "key", progress=False)
    (record,) = [json.loads(p.read_text()) for p in (cache / "patients").glob("*.json")]
    statuses = {s["series"]: s["status"] for s in record["series"]}
    (chosen,) = [name for name, status in statuses.items() if status == USED]
    assert chosen.startswith("CT series #9") and "missing_slices" in statuses.values(), statuses
    assert all("series_fallback" in r["flags"] for r in record["rows"])

    dicom = fallback_export / "dicom" / "patient"
    cfg = compose_cfg("segment", [f"ckpt={system['seg']}", f"image={dicom}", f"out={tmp_path / 'seg'}", "device=cpu"])
    segmented = segment(cfg)
    assert segmented["series"] == chosen and any(n.startswith("series_fallback") for n in segmented["notes"])

    cfg = compose_cfg("predict", [f"input={dicom}", f"output={tmp_path / 'out'}", f"system={system['folder']}"])
    cfg.levels, cfg.progress, cfg.paths.key_file = ["L1"], False, str(tmp_path / "key")
    (name,) = predict_run(cfg)["patients"]
    report = json.loads((tmp_path / "out" / name / "report.json").read_text())
    assert report["series"] == chosen and any(n.startswith("series_fallback") for n in report["notes"])
