"""SegmentationTask on a tiny synthetic spine: two boxes standing for L1 and L2 in a noisy 32x32x64 volume."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from ovcf.contract import LEVEL_IDS, LEVEL_ORDER
from ovcf.data.levels import class_to_verse, decode_classes, encode_verse, level_classes, verse_to_class
from ovcf.errors import ConfigError
from ovcf.models import create_model
from ovcf.models.segmenters import unet
from ovcf.tasks.segmentation import SegmentationTask, confusion, level_scores

LEVELS = ["L1", "L2"]
PATCH = (32, 32, 32)
SMALL_UNET = {"filters": [8, 16, 32, 64], "strides": [1, 2, 2, 2]}
# The boxes, as (x, y, z) slices, and their contrasts. The contrasts have opposite signs because the networks' instance
# norm removes a patch's absolute intensity: with L1 = 1 and L2 = 2 a patch holding only one body cannot tell which it
# is, and L1's Dice swung between 0.02 and 0.84 with the seed; with 1 and -1.5 it is 0.94-0.99 over four seeds.
BOXES = {1: (slice(10, 22), slice(10, 22), slice(6, 26)), 2: (slice(7, 25), slice(7, 25), slice(36, 58))}
CONTRAST = {1: 1.0, 2: -1.5}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """3D conv backward under CPU contention is much faster single-threaded."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def spine(seed: int, shift: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(image (1, 32, 32, 64) float, label (1, 32, 32, 64) class indices): the boxes in noise of sd 0.3."""
    g = torch.Generator().manual_seed(seed)
    label = torch.zeros(1, 32, 32, 64, dtype=torch.long)
    for c, (x, y, z) in BOXES.items():
        label[0, x, y, slice(z.start + shift, z.stop + shift)] = c
    image = 0.3 * torch.randn(1, 32, 32, 64, generator=g) + torch.tensor([0.0, CONTRAST[1], CONTRAST[2]])[label]
    return image, label


def crops(n: int, seed: int) -> list[dict]:
    """Random 32^3 patches along the long axis of noise-varied volumes."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        image, label = spine(seed + i)
        z = int(torch.randint(0, 33, (1,), generator=g))
        out.append({"image": image[..., z : z + 32], "label": label[..., z : z + 32]})
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
    image, label = spine(999)
    return {"image": torch.stack([image[..., :32], image[..., 32:]]), "label": torch.stack([label[..., :32], label[..., 32:]])}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A small U-Net trained for 40 steps (2 epochs x 20 batches of 2) through a real Trainer, validated and checkpointed."""
    L.seed_everything(0)
    root = tmp_path_factory.mktemp("seg")
    task = SegmentationTask(model_name="unet", model_kwargs=SMALL_UNET, levels=LEVELS, patch_size=PATCH, lr=1e-2)
    batch = fixed_batch()
    with torch.no_grad():
        before = float(task.train_loss(task(batch["image"]), batch["label"].float()))
    val = DataLoader([dict(zip(("image", "label"), spine(123, shift=1)))], batch_size=1)
    t = trainer(root, max_epochs=2)
    t.fit(task, DataLoader(crops(40, seed=1), batch_size=2), val)
    task.train()
    with torch.no_grad():
        after = float(task.train_loss(task(batch["image"]), batch["label"].float()))
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
    assert class_to_verse(LEVELS) == [0, 20, 21] and verse_to_class(LEVELS) == {0: 0, 20: 1, 21: 2}
    assert class_to_verse(["T12", "T13", "L1"]) == [0, 19, LEVEL_IDS["T13"], 20]
    mask = torch.tensor([0, 19, 20, 21, 28])
    assert encode_verse(mask, LEVELS).tolist() == [0, 0, 1, 2, 0]  # levels not segmented become background
    assert decode_classes(encode_verse(mask, LEVELS), LEVELS).tolist() == [0, 0, 20, 21, 0]
    for bad in (["L7"], ["L1", "L1"], []):
        with pytest.raises(ConfigError):
            level_classes(bad)
    with pytest.raises(ConfigError, match="in_channels"):
        SegmentationTask(model_kwargs={"in_channels": 2, **SMALL_UNET}, levels=LEVELS, patch_size=PATCH)


def test_dice_definition():
    # truth L1 x4, L2 x2, background x2; one L1 voxel predicted L2, one L1 voxel missed, one background voxel called L1
    truth = torch.tensor([1, 1, 1, 1, 2, 2, 0, 0])
    pred = torch.tensor([1, 1, 2, 0, 2, 2, 1, 0])
    dice, identified, spurious = level_scores(confusion(pred, truth, 3))
    assert dice.tolist() == pytest.approx([2 * 2 / (4 + 3), 2 * 2 / (2 + 3)])
    assert identified.tolist() == [True, True] and spurious.tolist() == [False, False]
    # L2 absent from the truth but predicted: no Dice of its own (NaN), flagged spurious; it still costs L1 a voxel
    dice, identified, spurious = level_scores(confusion(torch.tensor([1, 1, 2, 2]), torch.tensor([1, 1, 1, 0]), 3))
    assert dice[0] == pytest.approx(2 * 2 / (3 + 2)) and dice[1].isnan()
    assert identified.tolist() == [True, False] and spurious.tolist() == [False, True]
    # a body predicted as its neighbour's level, or not at all, is not identified
    _, identified, _ = level_scores(confusion(torch.tensor([2, 2, 0, 0]), torch.tensor([1, 1, 2, 2]), 3))
    assert identified.tolist() == [False, False]


def test_training_lowers_loss(trained):
    assert trained["after"] < 0.5 * trained["before"], (trained["before"], trained["after"])


def test_validation_dice_per_level(trained):
    task, metrics = trained["task"], trained["metrics"]
    # measured after these 40 steps: val/dice 0.99 (seed 0; 0.97-0.99 over seeds 0-3), per level >= 0.93
    assert metrics["val/dice"] > 0.85, metrics
    per_level = task.per_level_dice("val")
    assert set(per_level) == set(LEVELS) and min(per_level.values()) > 0.75, per_level
    assert metrics["val/dice_L1"] == pytest.approx(per_level["L1"])
    assert task.level_accuracy("val") == 1.0 and metrics["val/level_accuracy"] == 1.0
    assert {"val/loss", "val/spurious_levels"} <= set(metrics)
    test = trained["trainer"].test(task, trained["val"], verbose=False)[0]
    assert test["test/dice"] == pytest.approx(metrics["val/dice"], abs=1e-5)
    assert task.per_level_dice("test") == pytest.approx(per_level)


def test_predict_volume_gives_verse_ids(trained):
    image, label = spine(321, shift=-1)
    pred = trained["task"].predict_volume(image[None])
    assert pred.shape == (32, 32, 64) and pred.dtype == torch.long
    assert set(pred.unique().tolist()) <= {0, 20, 21}
    truth = decode_classes(label[0], LEVELS)
    for verse in (20, 21):
        assert (pred[truth == verse] == verse).float().mean() > 0.8, verse
    assert (pred == truth).float().mean() > 0.95
    with pytest.raises(ValueError, match="1, 1, X, Y, Z"):
        trained["task"].predict_volume(image)


def test_checkpoint_round_trip(trained):
    loaded = SegmentationTask.load_from_checkpoint(trained["ckpt"], map_location="cpu")
    assert loaded.levels == LEVELS and list(loaded.hparams.patch_size) == list(PATCH)
    image, _ = spine(77)
    assert torch.equal(loaded.predict_volume(image[None]), trained["task"].predict_volume(image[None]))


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
    task = SegmentationTask(model_name=name, model_kwargs=kwargs, levels=LEVELS, patch_size=PATCH)
    task.train()
    opt = task.configure_optimizers()
    loss = task.training_step(fixed_batch(), 0)  # deep supervision: several outputs, one weighted loss
    assert torch.isfinite(loss)
    loss.backward()
    opt.step()
    image, _ = spine(5)
    pred = task.predict_volume(image[None, :, :24, :, :40])  # smaller than a patch on one axis: padded, cropped back
    assert pred.shape == (24, 32, 40) and set(pred.unique().tolist()) <= {0, 20, 21}
    assert task.training  # predict_volume restores the mode
