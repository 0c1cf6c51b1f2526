"""Predicted masks: back on the CT's voxels, written per pseudonym, and usable as the classifier's ROI source."""

from __future__ import annotations

import csv
import json
import shutil

import lightning as L
import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import EXAMPLE_BODIES, EXAMPLE_CT, TOTALSEG, needs_example_ct, run_cli

from ovcf.data.ct import IngestChecks
from ovcf.data.ingest import ingest, read_index
from ovcf.data.pseudonym import load_key, pseudonym
from ovcf.data.roi import RoiSpec
from ovcf.eval.metrics import label_dice, matched_dice
from ovcf.inference.models import check_on_ct, load_segmenter, to_ct_grid
from ovcf.tasks import SegmentationTask


def test_labels_go_back_to_the_ct_voxels_in_world_coordinates():
    """A 2 mm RAS label map copied onto an LPS-ordered, anisotropic CT grid keeps every body where it was."""
    labels = np.zeros((40, 40, 50), np.uint8)
    labels[10:20, 12:22, 5:15], labels[10:20, 12:22, 25:40] = 20, 19
    labels_affine = np.diag([2.0, 2.0, 2.0, 1.0])
    labels_affine[:3, 3] = [-40.0, -30.0, 100.0]
    ct_affine = np.array([[-0.8, 0, 0, 39.0], [0, -0.8, 0, 49.0], [0, 0, 1.25, 100.0], [0, 0, 0, 1]])  # L-R and P-A flipped
    out = to_ct_grid(labels, labels_affine, ct_affine, (100, 100, 80))
    for verse in (19, 20):
        ours = nib.affines.apply_affine(ct_affine, np.argwhere(out == verse).mean(axis=0))
        theirs = nib.affines.apply_affine(labels_affine, np.argwhere(labels == verse).mean(axis=0))
        assert np.linalg.norm(ours - theirs) < 1.5, (verse, ours, theirs)
        ml = (out == verse).sum() * 0.8 * 0.8 * 1.25 / 1000
        assert abs(ml - (labels == verse).sum() * 8 / 1000) < 0.1 * ml
    assert label_dice(out, out) == {19: 1.0, 20: 1.0}  # VerSe ids of T12 and L1
    shifted = np.where(out > 0, out + 1, 0)  # every body named one level too low
    assert label_dice(shifted, out) == {19: 0.0, 20: 0.0} and matched_dice(shifted, out) == {19: 1.0, 20: 1.0}


def test_predicted_masks_replace_the_given_ones(tiny_cohort, tmp_path, capsys):
    """A folder of `<pseudonym>.nii.gz` masks (as ovcf.segment writes them) feeds ingest; a missing level is reported."""
    key = tmp_path / "key"
    roi = RoiSpec(24, 2.0, volume_spacing=2.0)
    given = ingest(tiny_cohort, tmp_path / "cache", roi, key, progress=False)
    truth = json.loads((tiny_cohort / "synth.json").read_text())["patients"]
    predicted = tmp_path / "predicted"
    predicted.mkdir()
    secret = load_key(key)
    rows = read_index(given)
    dropped = None
    for patient in truth:
        name = pseudonym(patient["patient_id"], secret)
        src = tiny_cohort / "masks" / f"{patient['patient_id']}.nii.gz"
        named = [r for r in rows if r["pseudonym"] == name and r["included"]]
        if dropped is None and named:  # this patient's prediction lacks its fractured level
            img = nib.load(src)
            data = np.asarray(img.dataobj).copy()
            from ovcf.contract import LEVEL_IDS

            data[data == LEVEL_IDS[named[0]["level"]]] = 0
            nib.save(nib.Nifti1Image(data, img.affine), predicted / f"{name}.nii.gz")
            dropped = (name, named[0]["row"])
        else:
            shutil.copy(src, predicted / f"{name}.nii.gz")
    cache = ingest(tiny_cohort, tmp_path / "cache", roi, key, progress=False, masks=predicted)
    assert cache != given  # a cache of its own
    new = {r["row"]: r for r in read_index(cache)}
    for r in rows:
        if r["row"] == dropped[1]:
            assert "level_mask_missing" in new[r["row"]]["flags"]
            continue
        assert new[r["row"]]["included"] == r["included"]
        if r["included"]:
            with (
                np.load(given / "samples" / f"{r['pseudonym']}.npz") as a,
                np.load(cache / "samples" / f"{r['pseudonym']}.npz") as b,
            ):
                assert np.array_equal(a[f"r{r['row']}_image"], b[f"r{r['row']}_image"])
    from ovcf.data.datamodule import predicted_mask_warnings

    warnings = predicted_mask_warnings(list(new.values()))
    assert len(warnings) == 1 and warnings[0].startswith(dropped[0])
    with pytest.raises(Exception, match="ovcf.segment"):
        ingest(tiny_cohort, tmp_path / "cache", roi, key, progress=False, masks=tmp_path / "nowhere")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A small U-Net segmenter after a few steps on noise: the plumbing, not the quality, is under test."""
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("segckpt")
    task = SegmentationTask(model_kwargs={"filters": [4, 8, 16], "strides": [1, 2, 2]}, patch_size=(32, 32, 32))
    batch = [{"image": torch.rand(1, 32, 32, 32), "label": torch.randint(0, 4, (1, 32, 32, 32))}]
    trainer = L.Trainer(
        max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False
    )
    trainer.fit(task, torch.utils.data.DataLoader(batch, batch_size=1))
    path = root / "seg.ckpt"
    trainer.save_checkpoint(path)
    raw = torch.load(path, weights_only=False)  # what ovcf.train's data module records: how the CT was read
    raw["datamodule_hyper_parameters"] = {"hu_window": [-250.0, 1250.0], "volume_spacing": 2.0}
    torch.save(raw, path)
    return path


@pytest.mark.slow(seconds=59)
def test_segment_cohort_writes_one_mask_per_patient_on_its_ct(checkpoint, tiny_cohort, cli_env, tmp_path):
    out = tmp_path / "masks"
    proc = run_cli(
        "ovcf.segment", [f"ckpt={checkpoint}", f"data.cohort={tiny_cohort}", f"out={out}", "progress=false"], cli_env, tmp_path
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    table = list(csv.DictReader(open(out / "segment.csv")))
    assert len(table) == 8 and all(r["pseudonym"].startswith("p") for r in table)
    truth = json.loads((tiny_cohort / "synth.json").read_text())["patients"]
    ids = {p["patient_id"] for p in truth}
    for r in table:
        assert not any(i in r["pseudonym"] for i in ids)
    written = sorted(out.glob("*.nii.gz"))
    assert len(written) == sum(1 for r in table if not r["note"]) >= 6
    # every mask lies on the voxels of its patient's CT, as the cohort's own mask does
    secret = load_key(cli_env["OVCF_KEY_FILE"])
    for p in truth:
        ours = out / f"{pseudonym(p['patient_id'], secret)}.nii.gz"
        if ours.exists():
            theirs = nib.as_closest_canonical(nib.load(tiny_cohort / "masks" / f"{p['patient_id']}.nii.gz"))
            mask = nib.load(ours)
            assert mask.shape == theirs.shape and np.allclose(mask.affine, theirs.affine, atol=0.01)
    assert "data.roi_source=predicted" in proc.stdout


@needs_example_ct
@pytest.mark.slow(seconds=122)
def test_segment_image_takes_nifti_and_dicom(checkpoint, cli_env, tmp_path):
    """One real CT, as NIfTI (with a reference) and as a DICOM folder: the mask comes back on its grid."""
    ct = EXAMPLE_CT
    ref = EXAMPLE_BODIES
    proc = run_cli(
        "ovcf.segment", [f"ckpt={checkpoint}", f"image={ct}", f"reference={ref}", f"out={tmp_path}"], cli_env, tmp_path
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    mask = nib.load(tmp_path / "example_ct_levels.nii.gz")
    assert mask.shape == nib.load(ct).shape and np.allclose(mask.affine, nib.load(ct).affine)
    result = json.loads((tmp_path / "example_ct_levels.json").read_text())
    assert set(result["dice"]) == {"T12", "L1", "L2", "L3", "L4", "L5"} and "Mean Dice" in proc.stdout
    dicom = TOTALSEG / "example_ct_dicom"
    proc = run_cli("ovcf.segment", [f"ckpt={checkpoint}", f"image={dicom}", f"out={tmp_path}"], cli_env, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(nib.load(tmp_path / "example_ct_dicom_levels.nii.gz").shape) == [20, 512, 512]
    proc = run_cli("ovcf.segment", [f"ckpt={checkpoint}", f"image={tmp_path / 'none.nii.gz'}"], cli_env, tmp_path)
    assert proc.returncode == 2 and "no such file" in proc.stderr
    # A training run's check on labelled CTs scores as this command does; a missing file is skipped, not fatal.
    task, settings = load_segmenter(checkpoint)
    pairs = [{"image": ct, "reference": ref}, {"image": tmp_path / "gone.nii.gz", "reference": ref}]
    checks = check_on_ct(task, settings, pairs, IngestChecks())
    assert checks[0]["dice"] == pytest.approx(result["dice"]) and checks[0]["body_dice"] == pytest.approx(result["body_dice"])
    assert checks[0]["levels"] == result["levels"] and checks[0]["anchor"] == result["anchor"]
    assert checks[1] == {"name": "gone", "skipped": f"{tmp_path / 'gone.nii.gz'} not found"}
