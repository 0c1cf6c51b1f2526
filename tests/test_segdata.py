"""Segmentation data: patches of the training patients, whole scans for validation and the external test."""

from __future__ import annotations

import numpy as np
import torch

from ovcf.data.segdata import SegmentationDataModule


def test_patches_and_whole_scans_split_by_patient(tiny_cohort, tmp_path):
    dm = SegmentationDataModule(
        patch_size=(32, 32, 32),
        samples_per_volume=6,
        foreground=1.0,
        cohort=str(tiny_cohort),
        cache_dir=str(tmp_path / "cache"),
        key_file=str(tmp_path / "key"),
        roi_size=24,
        roi_spacing=2.0,
        hu_window=(-250, 1250),
        volume_spacing=2.0,
        val_fraction=0.5,
        batch_size=4,
        progress=False,
    )
    dm.setup()
    train, val, test = (dm.datasets[k] for k in ("train", "val", "test"))
    names = {k: {item["id"] for item in ds.items} for k, ds in (("train", train.volumes), ("val", val), ("test", test))}
    assert names["train"] and names["val"] and names["test"]
    assert not (names["train"] & names["val"]) and not (names["test"] & (names["train"] | names["val"])), "split by patient"
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (4, 1, 32, 32, 32) and batch["label"].shape == (4, 1, 32, 32, 32)
    assert all((batch["label"][i] > 0).any() for i in range(4)), "foreground=1: every patch holds a body"
    assert 0.0 <= float(batch["image"].min()) and float(batch["image"].max()) <= 1.0
    assert set(torch.unique(batch["label"]).tolist()) <= {0, 2, 3}, "region classes: background, thoracic, lumbar"
    scan = next(iter(dm.val_dataloader()))
    assert scan["image"].shape[0] == 1 and scan["image"].shape[2:] == scan["label"].shape[2:] == scan["verse"].shape[2:]
    assert len(torch.unique(scan["verse"])) >= 6, "background and at least five levels"
    assert torch.allclose(scan["spacing"][0], torch.tensor([2.0, 2.0, 2.0], dtype=torch.float64))
    fractured = scan["fractured"][0].nonzero().flatten().tolist()
    assert fractured and set(fractured) <= set(torch.unique(scan["verse"]).tolist()), "named fractures are in the scan"
    a, b = train[(0, 0)], train[(0, 0)]
    assert torch.equal(a["image"], b["image"]), "same seed, epoch and index: same patch"
    assert not np.array_equal(train[(0, 1)]["image"].numpy(), a["image"].numpy()), "a new epoch draws new patches"
