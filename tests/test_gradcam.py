"""Grad-CAM: every model family gets a map on the ROI grid, and a model that learned a planted
condensation band looks at the band."""

from __future__ import annotations

import lightning as L
import numpy as np
import pytest
import torch
from conftest import synthetic_params
from torch.utils.data import DataLoader

from ovcf.data.datamodule import load_samples
from ovcf.data.ingest import IngestChecks, RoiSpec, ingest, read_index
from ovcf.eval.gradcam import gradcam, overlay_figure, region_ratio, target
from ovcf.tasks import ClassificationTask
from ovcf.tasks.classification import binary_metrics

FAMILIES = {
    "densenet121": ("features.denseblock", "sagittal"),
    "vgg16": ("features.", "sagittal"),
    "vit": ("patch_embed.proj", "sagittal"),
    "densenet121_3d": ("features.denseblock", "3d"),
    "vgg16_3d": ("features.", "3d"),
    "vit_3d": ("patch_embedding", "3d"),
    "transformer": ("encoder.", "slices"),
}


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_every_family_maps_onto_the_roi(name):
    torch.manual_seed(0)
    kwargs = {"img_size": 32} if name in ("vit", "vit_3d") else {}
    task = ClassificationTask(name, kwargs, clinical=True).eval()
    images = torch.rand(2, 1, 32, 32, 32)
    layer, layout = target(task, images)
    part, expected = FAMILIES[name]
    assert part in layer and layout == expected
    cam = gradcam(task, images, torch.zeros(2, 3))
    assert cam.shape == (2, 32, 32, 32) and cam.min() >= 0 and cam.max() <= 1
    assert not task.training  # MONAI's hooks leave the model as they found it
    if layout == "sagittal":  # a 2.5D net saw only the central slab of sagittal planes
        assert cam[:, 0].max() == 0 and cam[:, -1].max() == 0


def _rows(cache):
    return [r for r in read_index(cache) if r["included"]]


@pytest.mark.slow
def test_heatmap_concentrates_on_a_planted_band(tmp_path):
    """Acute fractures carry a condensation band and nothing else tells the labels apart; the same
    center is rendered again without the band (every other draw identical), so the band's voxels are
    where the two renderings differ. A model that learned the task must put more heat on them."""
    from ovcf.synth.cohort import generate_cohort

    band = {"p": 1.0, "hu": [250, 350], "depth_mm": [2.0, 3.0], "width_mm": [5.0, 7.0]}
    export = {"localizer": False, "mr_series": False, "thick_ct_fraction": 0.0, "extensions": [".dcm"]}
    params = synthetic_params(
        patients_per_center=20,
        difficulty=0.0,  # the band at full contrast
        n_levels=[5, 5],
        signs={"acute": {"impaction_band": band}, "chronic": {}},
        grades={"acute": [1, 1, 1], "chronic": [1, 1, 1]},  # height loss says nothing either
        export=export,
        render_centers=["A"],
    )
    # a coarser scanner renders faster; the 5-7 mm band stays several voxels wide
    params["centers"]["A"] |= {"pixel_spacing": 1.0, "matrix": 128, "slice_thickness": 1.5, "slice_spacing": 1.5}
    roi, caches = RoiSpec(32, 1.5, None), {}
    for name, ablate in (("band", []), ("plain", ["impaction_band"])):
        folder = generate_cohort(tmp_path / name, num_workers=2, progress=False, **(params | {"ablate": ablate}))
        caches[name] = ingest(folder, tmp_path / "cache", roi, tmp_path / "key", 2, False, IngestChecks.from_config(None))
    rows = _rows(caches["band"])
    patients = sorted({r["pseudonym"] for r in rows})
    held_out = set(patients[::4])
    train = load_samples(caches["band"], [r for r in rows if r["pseudonym"] not in held_out], 32, (-250, 1250))
    test = load_samples(caches["band"], [r for r in rows if r["pseudonym"] in held_out], 32, (-250, 1250))

    L.seed_everything(0)
    task = ClassificationTask("densenet121", {"slice_step": 2}, lr=1e-3)
    trainer = L.Trainer(max_epochs=12, logger=False, enable_checkpointing=False, enable_progress_bar=False)
    trainer.fit(task, DataLoader(train, batch_size=8, shuffle=True, generator=torch.Generator().manual_seed(0)))
    task.eval()
    with torch.no_grad():
        probs = torch.sigmoid(task(test.images))
    auroc = binary_metrics()["auroc"]
    assert float(auroc(probs, test.labels.int())) >= 0.9, "the model must have learned the band before we ask where it looks"

    plain = {(r["pseudonym"], r["level"]): r for r in _rows(caches["plain"])}
    acute = [r for r in rows if r["label"] == "acute"]
    with_band = load_samples(caches["band"], acute, 32, (-250, 1250))
    without = load_samples(caches["plain"], [plain[(r["pseudonym"], r["level"])] for r in acute], 32, (-250, 1250))
    region = ((with_band.images - without.images).abs()[:, 0] > 0.03).numpy()  # > 45 HU of difference
    cams = gradcam(task, with_band.images)
    ratios = [region_ratio(c, m) for c, m in zip(cams, region) if m.any()]
    print(
        f"held-out AUROC {float(auroc(probs, test.labels.int())):.3f}; band/rest heat ratio median {np.median(ratios):.2f}",
        np.round(ratios, 2),
    )
    assert len(ratios) >= 8
    assert np.median(ratios) > 1.5, np.round(ratios, 2)
    overlay_figure([{"image": with_band.images[0, 0].numpy(), "cam": cams[0], "caption": "band"}], tmp_path / "band.png")
    assert (tmp_path / "band.png").stat().st_size > 10_000
