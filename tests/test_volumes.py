"""Whole-CT volumes cached for segmentation: isotropic, RAS, on the same world positions as the masks."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np

from ovcf.contract import LEVEL_IDS
from ovcf.data.ingest import ingest, read_index
from ovcf.data.pseudonym import load_key, pseudonym
from ovcf.data.roi import RoiSpec


def test_cached_volumes_keep_the_world_positions_of_the_bodies(tiny_cohort, tmp_path):
    cache = ingest(tiny_cohort, tmp_path / "cache", RoiSpec(24, 2.0, volume_spacing=2.0), tmp_path / "key", progress=False)
    truth = json.loads((tiny_cohort / "synth.json").read_text())["patients"]
    key = load_key(tmp_path / "key")
    included = {r["pseudonym"] for r in read_index(cache) if r["included"]}
    checked = 0
    for patient in truth:
        name = pseudonym(patient["patient_id"], key)
        if name not in included:
            continue
        mask = nib.as_closest_canonical(nib.load(tiny_cohort / "masks" / f"{patient['patient_id']}.nii.gz"))
        original = np.asarray(mask.dataobj)
        with np.load(cache / "samples" / f"{name}.npz") as npz:
            labels, image, affine = npz["volume_labels"], npz["volume_image"], npz["volume_affine"]
        assert np.allclose(np.linalg.norm(affine[:3, :3], axis=0), 2.0) and np.allclose(affine[:3, :3], np.diag([2.0] * 3))
        for level in patient["visible_levels"]:
            lid = LEVEL_IDS[level]
            ours = nib.affines.apply_affine(affine, np.argwhere(labels == lid).mean(axis=0))
            theirs = nib.affines.apply_affine(mask.affine, np.argwhere(original == lid).mean(axis=0))
            assert np.linalg.norm(ours - theirs) < 1.0, (level, ours, theirs)
            ml, ml0 = (labels == lid).sum() * 8 / 1000, (original == lid).sum() * np.prod(mask.header.get_zooms()) / 1000
            assert abs(ml - ml0) < 0.08 * ml0, (level, ml, ml0)
            assert np.median(image[labels == lid]) > 60, "labels sit on bone"
        checked += 1
    assert checked >= 4
