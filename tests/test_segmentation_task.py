"""SegmentationTask on a tiny synthetic spine: two boxes standing for T12 and L1 in a noisy 32x32x64 volume."""

from __future__ import annotations

import lightning as L
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from ovcf.contract import LEVEL_IDS, LEVEL_ORDER
from ovcf.data.instances import region_target
from ovcf.data.levels import class_to_verse, encode_verse, level_classes, verse_to_class
from ovcf.errors import ConfigError
from ovcf.eval.metrics import label_confusion, level_scores
from ovcf.models import create_model
from ovcf.models.segmenters import unet
from ovcf.tasks.segmentation import SegmentationTask

LEVELS = ["T12", "L1"]
PATCH = (32, 32, 32)
SMALL_UNET = {"filters": [8, 16, 32, 64], "strides": [1, 2, 2, 2]}
# The boxes (VerSe id: (x, y, z) slices; RAS, so the cranial T12 has the larger z) and their contrasts, which stand
# for "has rib heads" (thoracic) or not (lumbar). The contrasts have opposite signs because the networks' instance norm
# removes a patch's absolute intensity: with 1 and 2 a patch holding only one body cannot tell which it is.
BOXES = {20: (slice(10, 22), slice(10, 22), slice(6, 26)), 19: (slice(7, 25), slice(7, 25), slice(36, 58))}
CONTRAST = {20: 1.0, 19: -1.5}
SPACING = (1.0, 1.0, 1.0)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """3D conv backward under CPU contention is much faster single-threaded."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def spine(seed: int, shift: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(image (1, 32, 32, 64) float, VerSe ids (1, 32, 32, 64)): the boxes in noise of sd 0.3."""
    g = torch.Generator().manual_seed(seed)
    verse = torch.zeros(1, 32, 32, 64, dtype=torch.long)
    image = 0.3 * torch.randn(1, 32, 32, 64, generator=g)
    for v, (x, y, z) in BOXES.items():
        verse[0, x, y, slice(z.start + shift, z.stop + shift)] = v
        image[verse == v] += CONTRAST[v]
    return image, verse


def target(verse: torch.Tensor) -> torch.Tensor:
    return torch.from_numpy(region_target(verse.numpy()))


def volume(seed: int, shift: int = 0) -> dict:
    """A whole scan as `VolumeDataset` gives it; L1 named fractured."""
    image, verse = spine(seed, shift)
    fractured = torch.zeros(max(LEVEL_IDS.values()) + 1, dtype=torch.bool)
    fractured[LEVEL_IDS["L1"]] = True
    return {"image": image, "label": target(verse), "verse": verse, "fractured": fractured, "spacing": torch.tensor(SPACING)}


def crops(n: int, seed: int) -> list[dict]:
    """Random 32^3 patches along the long axis of noise-varied volumes."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        image, verse = spine(seed + i)
        z = int(torch.randint(0, 33, (1,), generator=g))
        out.append({"image": image[..., z : z + 32], "label": target(verse)[..., z : z + 32]})
    return out


def trainer(root, **kwargs) -> L.Trainer:
    return L.Trainer(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=root,
        **kwargs,
    )


def fixed_batch() -> dict:
    image, verse = spine(999)
    label = target(verse)
    return {"image": torch.stack([image[..., :32], image[..., 32:]]), "label": torch.stack([label[..., :32], label[..., 32:]])}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A small U-Net trained for 40 steps (2 epochs x 20 batches of 2) through a real Trainer, validated and checkpointed."""
    L.seed_everything(0)
    root = tmp_path_factory.mktemp("seg")
    task = SegmentationTask(model_name="unet", model_kwargs=SMALL_UNET, patch_size=PATCH, lr=1e-2, min_body_ml=0.5)
    batch = fixed_batch()
    with torch.no_grad():
        before = float(task.training_loss(batch)[0])
    val = DataLoader([volume(123, shift=1)], batch_size=1)
    t = trainer(root, max_epochs=2)
    t.fit(task, DataLoader(crops(40, seed=1), batch_size=2), val)
    task.train()
    with torch.no_grad():
        after = float(task.training_loss(batch)[0])
    metrics = t.validate(task, val, verbose=False)[0]
    ckpt = root / "seg.ckpt"
    t.save_checkpoint(ckpt)
    return {"task": task, "trainer": t, "val": val, "metrics": metrics, "before": before, "after": after, "ckpt": ckpt}


def test_unet_factory_shape_and_typos():
    net = unet(in_channels=1, out_channels=3, **SMALL_UNET)
    assert net(torch.randn(1, 1, 32, 32, 32)).shape == (1, 3, 32, 32, 32)
    assert type(create_model("unet", task="segmentation")).__name__ == "DynUNet"
    with pytest.raises(ConfigError, match="filtres"):
        unet(filtres=(8, 16))
    with pytest.raises(ConfigError, match="one filter count per stride"):
        unet(filters=(8, 16, 32), strides=(1, 2))


def test_level_mappings():
    assert level_classes() == LEVEL_ORDER and len(class_to_verse()) == len(LEVEL_ORDER) + 1
    assert level_classes(["L2", "T12", "L1"]) == ["T12", "L1", "L2"]  # cranio-caudal, whatever the config order
    lumbar = ["L1", "L2"]
    assert class_to_verse(lumbar) == [0, 20, 21] and verse_to_class(lumbar) == {0: 0, 20: 1, 21: 2}
    assert class_to_verse(["T12", "T13", "L1"]) == [0, 19, LEVEL_IDS["T13"], 20]
    mask = torch.tensor([0, 19, 20, 21, 28])
    assert encode_verse(mask, lumbar).tolist() == [0, 0, 1, 2, 0]  # levels not scored become background
    for bad in (["L7"], ["L1", "L1"], []):
        with pytest.raises(ConfigError):
            level_classes(bad)
    with pytest.raises(ConfigError, match="in_channels"):
        SegmentationTask(model_kwargs={"in_channels": 2, **SMALL_UNET}, patch_size=PATCH)
    with pytest.raises(ConfigError, match="region_slab"):
        SegmentationTask(model_kwargs=SMALL_UNET, patch_size=PATCH, region_slab=0)


def test_dice_definition():
    # truth L1 x4, L2 x2, background x2; one L1 voxel predicted L2, one L1 voxel missed, one background voxel called L1
    truth = torch.tensor([1, 1, 1, 1, 2, 2, 0, 0])
    pred = torch.tensor([1, 1, 2, 0, 2, 2, 1, 0])
    dice, identified, spurious = level_scores(label_confusion(pred, truth, 3))
    assert dice.tolist() == pytest.approx([2 * 2 / (4 + 3), 2 * 2 / (2 + 3)])
    assert identified.tolist() == [True, True] and spurious.tolist() == [False, False]
    # L2 absent from the truth but predicted: no Dice of its own (NaN), flagged spurious; it still costs L1 a voxel
    dice, identified, spurious = level_scores(label_confusion(torch.tensor([1, 1, 2, 2]), torch.tensor([1, 1, 1, 0]), 3))
    assert dice[0] == pytest.approx(2 * 2 / (3 + 2)) and dice[1].isnan()
    assert identified.tolist() == [True, False] and spurious.tolist() == [False, True]
    # a body predicted as its neighbour's level, or not at all, is not identified
    _, identified, _ = level_scores(label_confusion(torch.tensor([2, 2, 0, 0]), torch.tensor([1, 1, 2, 2]), 3))
    assert identified.tolist() == [False, False]


def test_training_lowers_loss(trained):
    assert trained["after"] < 0.5 * trained["before"], (trained["before"], trained["after"])


def test_validation_dice_per_level(trained):
    task, metrics = trained["task"], trained["metrics"]
    # measured after these 40 steps: val/dice 0.99 (seed 0), per level >= 0.93
    assert metrics["val/dice"] > 0.85, metrics
    per_level = task.per_level_dice("val")
    assert set(per_level) == set(LEVELS) and min(per_level.values()) > 0.75, per_level
    assert metrics["val/dice_L1"] == pytest.approx(per_level["L1"])
    assert metrics["val/dice_fractured"] == pytest.approx(per_level["L1"]) and metrics["val/dice_intact"] == pytest.approx(
        per_level["T12"]
    )
    assert task.level_accuracy("val") == 1.0 and metrics["val/level_accuracy"] == 1.0
    assert metrics["val/body_dice"] > 0.85 and {"val/loss", "val/spurious_levels"} <= set(metrics)
    test = trained["trainer"].test(task, trained["val"], verbose=False)[0]
    assert test["test/dice"] == pytest.approx(metrics["val/dice"], abs=1e-5)
    assert task.per_level_dice("test") == pytest.approx(per_level)


def test_levels_restrict_what_is_scored_and_returned(trained):
    task = trained["task"]
    lumbar = SegmentationTask(model_kwargs=SMALL_UNET, patch_size=PATCH, levels=["L1"], min_body_ml=0.5)
    lumbar.load_state_dict(task.state_dict())
    image, _ = spine(321)
    pred, assignment = lumbar.predict_volume(image[None], SPACING)
    assert assignment.levels == ["T12", "L1"] and set(pred.unique().tolist()) == {0, 20}  # T12 counted, not returned


def test_predict_volume_gives_verse_ids(trained):
    image, verse = spine(321, shift=-1)
    pred, assignment = trained["task"].predict_volume(image[None], SPACING)
    assert pred.shape == (32, 32, 64) and pred.dtype == torch.long
    assert assignment.levels == ["T12", "L1"] and assignment.anchored
    truth = verse[0]
    for v in (19, 20):
        assert (pred[truth == v] == v).float().mean() > 0.8, v
    assert (pred == truth).float().mean() > 0.95
    with pytest.raises(ValueError, match="1, 1, X, Y, Z"):
        trained["task"].predict_volume(image)


def test_checkpoint_round_trip(trained):
    loaded = SegmentationTask.load_from_checkpoint(trained["ckpt"], map_location="cpu")
    assert loaded.hparams.min_body_ml == 0.5 and list(loaded.hparams.patch_size) == list(PATCH)
    image, _ = spine(77)
    assert torch.equal(loaded.predict_volume(image[None], SPACING)[0], trained["task"].predict_volume(image[None], SPACING)[0])


def test_unet_refuses_a_patch_its_strides_do_not_divide():
    with pytest.raises(ConfigError, match=r"patch_size \[32, 32, 28\] is not divisible by 8 .* along axis 3 \(28\)"):
        SegmentationTask(model_kwargs=SMALL_UNET, patch_size=(32, 32, 28))
    assert SegmentationTask(model_kwargs=SMALL_UNET, patch_size=(40, 32, 32)).hparams.model_kwargs == SMALL_UNET


@pytest.mark.parametrize(
    "name, kwargs",
    [
        ("unet", {**SMALL_UNET, "deep_supervision": True, "deep_supr_num": 2}),
        ("unetr_pp", {"feature_size": 8, "depths": [1, 1, 1, 1], "num_heads": 2, "proj_size": 8, "deep_supervision": True}),
        ("umamba", {"features": [8, 16, 32], "d_state": 4, "deep_supervision": True}),
    ],
)
def test_other_networks_train_and_infer(name, kwargs):
    torch.manual_seed(0)
    task = SegmentationTask(model_name=name, model_kwargs=kwargs, patch_size=PATCH)
    task.train()
    opt = task.configure_optimizers()
    loss = task.training_step(fixed_batch(), 0)  # deep supervision: several outputs, one weighted loss
    assert torch.isfinite(loss)
    loss.backward()
    opt.step()
    image, _ = spine(5)
    regions = task.predict_regions(image[None, :, :24, :, :40])  # smaller than a patch on one axis: padded, cropped back
    assert regions.shape == (24, 32, 40) and set(np.unique(regions).tolist()) <= {0, 1, 2, 3}
    assert task.training  # predict_volume restores the mode
