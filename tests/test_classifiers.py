"""The classification zoo: every name runs, clinical fusion reaches the head, local weights load, imbalance is handled."""

from __future__ import annotations

import csv
import json

import lightning as L
import numpy as np
import pytest
import timm
import torch
from conftest import compose_cfg, run_cli
from omegaconf import OmegaConf

from ovcf.data import CohortDataModule
from ovcf.data.datamodule import VertebraDataset
from ovcf.errors import ConfigError
from ovcf.eval.leaderboard import write_leaderboard
from ovcf.models import create_model, list_models
from ovcf.models.classifiers import adapt_first_conv
from ovcf.tasks import ClassificationTask

ZOO = ["vgg16", "densenet121", "vit", "swin", "densenet121_3d", "vgg16_3d", "vit_3d", "transformer"]


def _kwargs(name: str, roi: int, in_channels: int) -> dict:
    """The model config's kwargs at a tiny ROI (as `data.roi_size` and `data.in_channels` set them)."""
    cfg = compose_cfg("train", [f"model={name}", f"data.roi_size={roi}", f"data.in_channels={in_channels}"])
    return OmegaConf.to_container(cfg.model.model_kwargs, resolve=True)


def test_the_zoo_is_registered():
    assert set(ZOO) <= set(list_models("classification"))


@pytest.mark.parametrize("name", ZOO)
@pytest.mark.parametrize("in_channels", [1, 2])
def test_every_model_runs_forward_and_backward(name, in_channels):
    """Features of the announced width; one logit per vertebra; gradients reach the first layer."""
    torch.manual_seed(0)
    roi = 32
    net = create_model(name, task="classification", **_kwargs(name, roi, in_channels))
    x = torch.rand(2, in_channels, roi, roi, roi)
    features = net(x)
    assert features.shape == (2, net.num_features) and torch.isfinite(features).all()
    task = ClassificationTask(name, _kwargs(name, roi, in_channels))
    logits = task(x)
    assert logits.shape == (2,)
    logits.sum().backward()
    first = next(p for p in task.net.parameters() if p.ndim >= 3)
    assert first.grad is not None and first.grad.abs().sum() > 0
    # A 2.5D network names the X rows it reads, and the training augmentation makes only those: no other row may count.
    reads = task.reads(roi)
    assert (reads is not None) == (name in ("vgg16", "densenet121", "vit", "swin"))
    if reads is not None:
        x = x.clone().requires_grad_()
        (task.net(x) * torch.randn(net.num_features)).sum().backward()  # a plain sum of a LayerNorm's output is flat
        read = torch.zeros(roi, dtype=torch.bool)
        read[reads[0] : reads[1]] = True
        assert x.grad[:, :, ~read].abs().max() == 0 and x.grad[:, :, reads[0]].abs().max() > 0
        assert x.grad[:, :, reads[1] - 1].abs().max() > 0


@pytest.mark.parametrize("name", ["vit", "swin", "vit_3d"])
def test_conv_stem_makes_the_same_token_grid(name):
    """The convolutional stem replaces the patchify layer without changing the tokens' grid or width."""
    kwargs = _kwargs(name, 32, 1)
    stem, plain = (create_model(name, task="classification", **(kwargs | {"conv_stem": c})) for c in (True, False))
    layer = (lambda n: n.net.patch_embed.proj) if name != "vit_3d" else (lambda n: n.vit.patch_embedding.patch_embeddings)
    image = torch.rand(2, 5 if name != "vit_3d" else 1, *(32,) * (2 if name != "vit_3d" else 3))
    assert isinstance(layer(stem), torch.nn.Sequential) and not isinstance(layer(plain), torch.nn.Sequential)
    assert layer(stem)(image).shape == layer(plain)(image).shape
    with pytest.raises(ConfigError, match="power of 2"):
        create_model("vit", task="classification", **(_kwargs("vit", 30, 1) | {"patch_size": 6}))


def test_clinical_fusion_widens_the_head_and_changes_the_output():
    torch.manual_seed(0)
    kwargs = _kwargs("transformer", 32, 1)
    image_only = ClassificationTask("transformer", kwargs)
    fused = ClassificationTask("transformer", kwargs, clinical=True)
    width = image_only.net.num_features
    assert image_only.head[-1].in_features == width and fused.head[-1].in_features == width + 3
    fused.eval()
    x = torch.rand(2, 1, 32, 32, 32)
    young_man = torch.tensor([[-1.0, -1.0, 1.0]] * 2)
    old_woman = torch.tensor([[2.0, 1.0, -1.5]] * 2)
    with torch.no_grad():
        assert not torch.allclose(fused(x, young_man), fused(x, old_woman))
    with pytest.raises(ValueError, match="clinical"):
        fused(x)


def test_first_conv_adapts_to_the_channel_count():
    weight = torch.randn(8, 3, 3, 3, 3)
    adapted = adapt_first_conv(weight, 2)
    assert adapted.shape == (8, 2, 3, 3, 3)
    x = torch.rand(1, 1, 5, 5, 5)  # the same image on every channel gives the kernel's own response
    same = torch.nn.functional.conv3d(x.expand(1, 3, -1, -1, -1), weight)
    assert torch.allclose(torch.nn.functional.conv3d(x.expand(1, 2, -1, -1, -1), adapted), same, atol=1e-5)


def test_local_weights_load_into_3d_and_timm_models(tmp_path):
    """weights=PATH: a 1-channel checkpoint fills a 2-channel net (first conv adapted); timm loads its own files."""
    torch.manual_seed(0)
    source = create_model("vgg16_3d", in_channels=1)
    torch.save(source.state_dict(), tmp_path / "vgg3d.pt")
    loaded = create_model("vgg16_3d", in_channels=2, pretrained=True, weights=str(tmp_path / "vgg3d.pt"))
    first = "features.0.weight"
    assert torch.allclose(loaded.state_dict()[first], adapt_first_conv(source.state_dict()[first], 2))
    assert torch.equal(loaded.state_dict()["features.3.weight"], source.state_dict()["features.3.weight"])

    donor = timm.create_model("vgg16_bn", pretrained=False, num_classes=1000)  # an ImageNet-shaped file
    torch.save(donor.state_dict(), tmp_path / "vgg16_bn.pth")
    net = create_model("vgg16", n_slices=5, pretrained=True, weights=str(tmp_path / "vgg16_bn.pth"))
    assert torch.equal(net.net.features[3].weight, donor.features[3].weight)
    assert net.net.features[0].weight.shape[1] == 5

    with pytest.raises(ConfigError, match="not found"):
        create_model("vit_3d", weights=str(tmp_path / "missing.pt"))
    with pytest.raises(ConfigError, match="weights=PATH"):
        create_model("densenet121", pretrained=True)


def _dataset(n: int, n_acute: int) -> VertebraDataset:
    rows = [
        {"pseudonym": f"P{i}", "level": "L1", "label": "acute" if i < n_acute else "chronic", "age": 70.0, "sex": "F"}
        | {"dxa_t_score": -2.5}
        for i in range(n)
    ]
    return VertebraDataset(rows, np.zeros((n, 8, 8, 8), np.float32), np.ones((n, 8, 8, 8), np.uint8), (-250, 1250))


def test_balanced_sampler_and_automatic_pos_weight(tiny_cohort):
    """1 acute in 10: the balanced sampler draws about half acute; pos_weight=auto weighs acute 9x."""
    dm = CohortDataModule(str(tiny_cohort), 8, 2.0, (-250, 1250), sampler="balanced", batch_size=10, seed=0)
    dm.datasets = {"train": _dataset(100, 10)}
    drawn = torch.cat([b["label"] for _ in range(20) for b in dm.train_dataloader()])
    assert 0.4 < drawn.mean().item() < 0.6

    task = ClassificationTask("transformer", _kwargs("transformer", 8, 1), pos_weight="auto")
    task.trainer = L.Trainer(logger=False)
    task.trainer.datamodule = dm
    task.on_fit_start()
    assert task.pos_weight.item() == pytest.approx(9.0)
    logits, labels = torch.zeros(2), torch.tensor([1.0, 0.0])
    assert task.loss(logits, labels).item() == pytest.approx((9 + 1) * np.log(2) / 2)
    with pytest.raises(ConfigError, match="pos_weight"):
        ClassificationTask("transformer", pos_weight="often")
    with pytest.raises(ConfigError, match="sampler"):
        CohortDataModule(str(tiny_cohort), 8, 2.0, (-250, 1250), sampler="stratified")


def test_mask_channel_is_the_body_mask():
    ds = _dataset(2, 1)
    ds.mask_channel = True
    image = ds[0]["image"]
    assert image.shape == (2, 8, 8, 8) and torch.equal(image[1], torch.ones(8, 8, 8))


def test_cross_validation_writes_per_fold_metrics_and_an_ensemble(cli_env, tmp_path, tiny_cohort):
    """cv.folds=2 with the mask channel: one model per fold, val mean +- sd, external test by the fold ensemble."""
    run = tmp_path / "run"
    args = [
        "model=transformer",
        "debug=smoke",
        "cv.folds=2",
        "data.in_channels=2",
        f"data.cohort={tiny_cohort}",
        "data.roi_size=32",
        f"hydra.run.dir={run}",
    ]
    proc = run_cli("ovcf.train", args, cli_env, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Cross-validation (2 folds)" in proc.stdout
    folds = [json.loads((run / f"fold_{k}" / "results.json").read_text()) for k in (0, 1)]
    assert all((run / f"fold_{k}" / "checkpoints" / "last.ckpt").is_file() for k in (0, 1))
    splits = [json.loads((run / f"fold_{k}" / "splits.json").read_text()) for k in (0, 1)]
    val_patients = [set(s["folds"][k]["patients"]) for k, s in enumerate(splits)]
    assert val_patients[0] and val_patients[1] and not val_patients[0] & val_patients[1]
    results = json.loads((run / "results.json").read_text())
    aurocs = [f["val"]["auroc"] for f in folds]
    assert results["cv"] == {"folds": 2, "test": "ensemble"}
    assert results["val"]["auroc"] == pytest.approx(np.mean(aurocs))
    assert results["val_sd"]["auroc"] == pytest.approx(np.std(aurocs, ddof=1))
    rows = list(csv.DictReader(open(run / "test_predictions.csv")))
    assert len(rows) == results["n"]["test"] and rows
    for r in rows:
        assert float(r["probability"]) == pytest.approx((float(r["fold_0"]) + float(r["fold_1"])) / 2)
    model = ClassificationTask.load_from_checkpoint(run / "fold_0" / "checkpoints" / "last.ckpt", map_location="cpu")
    assert model.hparams.model_kwargs["in_channels"] == 2


def test_leaderboard_picks_by_validation_mean_and_shows_the_variant(tmp_path):
    """A CV classification sweep: the best validation mean wins even with the worse external test."""
    for run, (clinical, val, test) in enumerate([("false", 0.80, 0.95), ("true", 0.86, 0.70)]):
        folder = tmp_path / str(run)
        folder.mkdir()
        result = {
            "task": "classification",
            "model": "densenet121",
            "overrides": ["model=densenet121", f"model.clinical={clinical}", "cv.folds=5"],
            "val": {"auroc": val},
            "val_sd": {"auroc": 0.03},
            "cv": {"folds": 5, "test": "ensemble"},
            "test": {"auroc": test, "sensitivity": 0.7, "specificity": 0.8, "accuracy": 0.75},
            "params": 7_000_000,
            "fit_seconds": 600.0,
        }
        (folder / "results.json").write_text(json.dumps(result))
    write_leaderboard(tmp_path, "val/auroc")
    table = list(csv.DictReader(open(tmp_path / "leaderboard.csv")))
    assert [r["variant"] for r in table] == ["model.clinical=true", "model.clinical=false"]
    assert table[0]["best"] == "*" and float(table[0]["val_auroc"]) == 0.86 and float(table[0]["test_auroc"]) == 0.70
    assert float(table[0]["val_auroc_sd"]) == 0.03 and table[0]["folds"] == "5"


@pytest.mark.slow(seconds=81)
def test_refit_trains_on_every_development_patient_and_alone_tests(cli_env, tmp_path, tiny_cohort):
    """cv.test=refit: the folds choose the epoch, one more model trains on all development patients
    for that long, and it alone scores the external center (evaluate's test rows are its own)."""
    from ovcf.inference.runs import run_members, run_predictions

    run = tmp_path / "run"
    args = ["model=densenet121", "debug=smoke", "cv.folds=2", "cv.test=refit", "trainer.max_epochs=4"]
    args += [f"data.cohort={tiny_cohort}", "data.roi_size=32", "data.progress=false", f"hydra.run.dir={run}"]
    proc = run_cli("ovcf.train", args, cli_env, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((run / "results.json").read_text())
    folds = [json.loads((run / f"fold_{k}" / "results.json").read_text()) for k in (0, 1)]
    best = [torch.load(run / f"fold_{k}" / f["best_checkpoint"], weights_only=False)["epoch"] for k, f in enumerate(folds)]
    stop = int(np.median(best))
    cv = dict(results["cv"])
    assert cv.pop("refit_seconds") > 0
    assert cv == {"folds": 2, "test": "refit", "refit_epoch": stop + 1, "fold_epochs": [e + 1 for e in best]}
    refit = json.loads((run / "refit" / "results.json").read_text())
    assert refit["stop_epoch"] == stop and refit["val"] == {}
    assert refit["n"]["train"] == folds[0]["n"]["train"] + folds[0]["n"]["val"] and "val" not in refit["n"]
    assert torch.load(run / "refit" / "checkpoints" / "last.ckpt", weights_only=False)["epoch"] == stop
    assert results["test"] == refit["test"]
    assert results["val"]["auroc"] == pytest.approx(np.mean([f["val"]["auroc"] for f in folds]))
    assert "test = one model refit" in proc.stdout

    assert [m[0] for m in run_members(run, "val")] == ["0", "1"] and [m[0] for m in run_members(run, "test")] == ["refit"]
    preds = run_predictions(run, progress=False)
    assert {r["fold"] for r in preds["val"]} == {"0", "1"} and {r["fold"] for r in preds["test"]} == {"refit"}
    assert len(preds["val"]) == refit["n"]["train"] and len(preds["tasks"]) == 1
    own = {r["id"]: float(r["probability"]) for r in csv.DictReader(open(run / "test_predictions.csv"))}
    assert own and all(own[f"{r['pseudonym']}:{r['level']}"] == pytest.approx(r["probability"], abs=1e-5) for r in preds["test"])

    bad = run_cli("ovcf.train", [*args[:-1], f"hydra.run.dir={tmp_path / 'bad'}", "cv.test=best"], cli_env, tmp_path)
    assert bad.returncode != 0 and "cv.test=best" in bad.stderr and "ensemble" in bad.stderr and "refit" in bad.stderr
