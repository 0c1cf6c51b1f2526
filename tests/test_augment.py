"""Training augmentation: config names build torchio pipelines, and our scanner transforms (kernel,
slice thickness, correlated noise, HU offset) do what a scanner does, in HU and mm, reproducibly
under a seed."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torchio as tio
from conftest import compose_cfg
from omegaconf import OmegaConf

from ovcf.data.augment import (
    OURS,
    RandomCorrelatedNoise,
    RandomHuOffset,
    RandomKernel,
    RandomSliceThickness,
    build_augment,
    scale_augment,
)
from ovcf.errors import ConfigError

WINDOW = (-250.0, 1250.0)  # the default data.hu_window: 1500 HU per unit


def _cube(seed: int = 0, noise: float = 0.01) -> tio.Subject:
    """A bright ball in a noisy background (a body in soft tissue), on a 24^3 grid."""
    g = torch.Generator().manual_seed(seed)
    z, y, x = torch.meshgrid(*(torch.arange(24.0),) * 3, indexing="ij")
    ball = (((z - 12) ** 2 + (y - 12) ** 2 + (x - 12) ** 2) < 49).float() * 0.5 + 0.2
    return tio.Subject(image=tio.ScalarImage(tensor=(ball + noise * torch.randn(24, 24, 24, generator=g))[None]))


def _flat(n: int = 32, value: float = 0.4) -> tio.Subject:
    return tio.Subject(image=tio.ScalarImage(tensor=torch.full((1, n, n, n), value)))


def _edge(t: torch.Tensor, dim: int = 1) -> float:
    """Edge sharpness: the largest step between neighbours along `dim` (1: x, 3: z)."""
    return float(torch.diff(t, dim=dim).abs().max())


def _correlation_length(noise: torch.Tensor) -> int:
    """The first lag (voxels, along x) at which the noise's autocorrelation falls below 0.5."""
    n = noise[0] - noise[0].mean()
    for lag in range(1, n.shape[-1] // 2):
        if float((n[..., lag:] * n[..., :-lag]).mean() / n.var(unbiased=False)) < 0.5:
            return lag
    return n.shape[-1] // 2


NEW = {
    "RandomKernel": {"gain": [-1.0, 0.8], "sigma": [0.4, 1.2], "sigma_z": [0.4, 1.6]},
    "RandomSliceThickness": {"thickness": [1.0, 5.0], "spacing": 1.25},
    "RandomCorrelatedNoise": {"hu": [5.0, 30.0], "grain": [0.3, 2.0], "hu_window": WINDOW},
    "RandomHuOffset": {"hu": [-20.0, 20.0], "hu_window": WINDOW},
}


@pytest.mark.parametrize("name", sorted(NEW))
def test_scanner_transforms_follow_the_seed(name):
    assert set(NEW) == set(OURS)

    def draw(seed):
        torch.manual_seed(seed)
        return OURS[name](**NEW[name])(_cube())["image"].data

    assert torch.equal(draw(3), draw(3)) and not torch.equal(draw(3), draw(4))


def test_hu_offset_shifts_the_mean_by_the_drawn_hu():
    before = _cube()["image"].data.mean().item()
    fixed = RandomHuOffset(hu=(15.0, 15.0), hu_window=WINDOW)(_cube())["image"].data.mean().item()
    assert fixed - before == pytest.approx(15.0 / 1500, abs=1e-6)
    wide = RandomHuOffset(hu=(15.0, 15.0), hu_window=(-1000, 1000))(_cube())["image"].data.mean().item()
    assert wide - before == pytest.approx(15.0 / 2000, abs=1e-6)  # the window converts HU
    shifts = []
    for seed in range(12):
        torch.manual_seed(seed)
        shifts.append((RandomHuOffset(hu=20.0, hu_window=WINDOW)(_cube())["image"].data.mean().item() - before) * 1500)
    assert max(np.abs(shifts)) <= 20.0 + 1e-3 and min(shifts) < -5 and max(shifts) > 5
    with pytest.raises(ConfigError, match="hu_window"):
        RandomHuOffset(hu_window=(100, -100))


def test_kernel_blurs_or_sharpens_and_keeps_the_mean():
    before = _cube(noise=0.0)["image"].data
    soft = RandomKernel(gain=(-1.0, -1.0), sigma=(1.0, 1.0))(_cube(noise=0.0))["image"].data
    sharp = RandomKernel(gain=(0.8, 0.8), sigma=(1.0, 1.0))(_cube(noise=0.0))["image"].data
    assert _edge(soft) < 0.7 * _edge(before) < 0.7 * _edge(sharp)
    assert sharp.max() > before.max() and sharp.min() < before.min()  # overshoot at the ball's edge
    for after in (soft, sharp):
        assert after.mean().item() == pytest.approx(before.mean().item(), abs=1e-3)
    # Anisotropic: a z-only kernel leaves in-plane edges alone.
    z_only = RandomKernel(gain=(-1.0, -1.0), sigma=(0.0, 0.0), sigma_z=(1.5, 1.5))(_cube(noise=0.0))["image"].data
    assert _edge(z_only) == pytest.approx(_edge(before), rel=0.05)
    assert _edge(z_only, dim=3) < 0.7 * _edge(before, dim=3)
    assert torch.equal(RandomKernel(gain=(0.0, 0.0))(_cube())["image"].data, _cube()["image"].data)
    harder = RandomKernel(gain=(-3.0, -2.0), sigma=(1.0, 1.0))(_cube(noise=0.0))["image"].data
    assert torch.equal(harder, soft)  # augment_strength > 1 pushes gains below -1: still a plain blur


def test_correlated_noise_has_the_requested_sd_and_grain():
    sub = {}
    for grain in (0.3, 2.0):
        torch.manual_seed(0)
        noise = RandomCorrelatedNoise(hu=(30.0, 30.0), grain=(grain, grain), hu_window=WINDOW)(_flat())["image"].data - 0.4
        assert noise.std().item() * 1500 == pytest.approx(30.0, rel=0.02)
        assert abs(noise.mean().item()) * 1500 < 1.0  # no offset: the band-pass has no DC
        sub[grain] = _correlation_length(noise)
    assert sub[0.3] == 1 and sub[2.0] >= 3  # fine grain vs blotches


def test_thick_slices_hide_a_thin_axial_line_but_not_an_in_plane_one():
    data = torch.full((1, 32, 32, 32), 0.4)
    data[:, :, :, 16] = 0.2  # a 1-voxel line across z
    data[:, 16, :, :] = 0.2  # a 1-voxel line along z
    out = RandomSliceThickness(thickness=(5.0, 5.0), spacing=1.25)(tio.Subject(image=tio.ScalarImage(tensor=data)))
    out = out["image"].data
    depth = 0.4 - out[0, 4, 4, 14:19].min().item()  # the axial line, far from the other
    assert 0.02 < depth < 0.2 * 0.5  # averaged over 4 voxels: at most about a quarter of its 0.2 depth
    assert out[0, 16, 4, 4].item() == pytest.approx(0.2, abs=1e-5)  # the line along z keeps its contrast
    thin = RandomSliceThickness(thickness=(1.0, 1.25), spacing=1.25)(tio.Subject(image=tio.ScalarImage(tensor=data)))
    assert torch.equal(thin["image"].data, data)  # at or below the ROI spacing: unchanged


def test_default_augmentation_spans_scanners_and_scales():
    spec = OmegaConf.to_container(compose_cfg("train", ["data.hu_window=[-1000,1000]"]).data.augment, resolve=True)
    assert set(OURS) <= set(spec) and "RandomFlip" in spec
    assert spec["RandomHuOffset"]["hu_window"] == [-1000, 1000]  # filled from data.hu_window
    assert spec["RandomSliceThickness"]["spacing"] == 1.25  # from data.roi_spacing
    double = scale_augment(spec, 2.0)
    assert double["RandomKernel"]["gain"] == pytest.approx([-2.0, 1.6])
    assert double["RandomCorrelatedNoise"]["hu"] == pytest.approx([0.0, 60.0])
    assert double["RandomHuOffset"]["hu"] == pytest.approx([-40.0, 40.0])
    assert double["RandomSliceThickness"]["thickness"] == pytest.approx([2.0, 10.0])
    assert double["RandomCorrelatedNoise"]["grain"] == spec["RandomCorrelatedNoise"]["grain"]  # a texture, not a magnitude
    torch.manual_seed(0)
    out = build_augment(spec)(_cube())["image"].data
    assert out.shape == (1, 24, 24, 24) and torch.isfinite(out).all()
    basic = OmegaConf.to_container(compose_cfg("train", ["data/augment=basic"]).data.augment, resolve=True)
    assert "RandomNoise" in basic and not set(OURS) & set(basic)  # torchio's names still work


def test_unknown_transform_names_the_field():
    with pytest.raises(ConfigError, match=r"data\.augment\.RandomSharpness.*RandomKernel"):
        build_augment({"RandomSharpness": {}})
    with pytest.raises(ConfigError, match=r"data\.augment\.RandomSliceThickness.*thickness"):
        build_augment({"RandomSliceThickness": {"thickness": [5.0, 1.0]}})
    with pytest.raises(ConfigError, match=r"data\.augment\.RandomHuOffset.*offset"):
        build_augment({"RandomHuOffset": {"offset": 20}})


def test_roi_bench_sees_a_wide_line_better_than_a_thin_one():
    from ovcf.bench.roi import line_contrast
    from ovcf.synth.scanner import Scanner

    scanner = Scanner()  # center A's protocol: 0.8 mm pixels, 1 mm slices, a soft kernel
    thin, wide = (line_contrast(scanner, 1.25, w, planes=4) for w in (0.8, 1.6))
    assert 0.2 < thin < wide < 0.9  # the scanner's PSF and the ROI leave part of the line's contrast


# --- the batched engine (ovcf.data.batch_augment): the same transforms on a whole batch at once


def _batch(n: int = 1, noise: float = 0.01) -> torch.Tensor:
    return torch.stack([_cube(seed=0, noise=noise)["image"].data for _ in range(n)])


def _stats(t: torch.Tensor) -> torch.Tensor:
    """Mean, SD and edge sharpness (mean absolute step along x and along z) of each sample."""
    dims = tuple(range(1, t.ndim))
    edges = [torch.diff(t, dim=d).abs().mean(dim=dims) for d in (-3, -1)]
    return torch.stack([t.mean(dim=dims), t.std(dim=dims), *edges], 1)


DEFAULT = {
    "RandomFlip": {"axes": [0]},
    "RandomAffine": {"scales": 0.08, "degrees": 8, "translation": 3},
    "RandomGamma": {"log_gamma": [-0.15, 0.15]},
    "RandomBiasField": {"coefficients": 0.3, "order": 2},  # stronger than the default, to be seen
    **NEW,
}


@pytest.mark.parametrize("name", sorted(DEFAULT))
def test_batched_transforms_match_torchio_in_distribution(name):
    from ovcf.data.batch_augment import BatchAugment

    n = 32
    spec = {name: DEFAULT[name]}
    batched, _ = BatchAugment(spec, seed=5)(_batch(n), list(range(n)), [0] * n)
    reference = []
    for seed in range(n):
        torch.manual_seed(seed)
        reference.append(build_augment(spec)(_cube(seed=0))["image"].data)
    ours, theirs = _stats(batched), _stats(torch.stack(reference))
    # Each statistic's mean over the draws agrees within 4 standard errors (or 1e-3 of the unit range).
    for k, what in enumerate(("mean", "SD", "edge x", "edge z")):
        a, b = ours[:, k], theirs[:, k]
        se = float((a.var() / n + b.var() / n).sqrt())
        assert abs(float(a.mean() - b.mean())) <= 4 * se + 1e-3, (what, float(a.mean()), float(b.mean()), se)
    if name == "RandomFlip":  # moves none of these statistics, only the voxels: about half mirrored
        cube = _batch(1)[0]
        for out in (batched, torch.stack(reference)):
            mirrored = sum(torch.equal(o, cube.flip(1)) for o in out)
            kept = sum(torch.equal(o, cube) for o in out)
            assert mirrored + kept == n and 8 <= mirrored <= 24
    else:  # and the transform did something: a statistic moved
        assert float((ours - _stats(_batch(1))).abs().amax(0).max()) > 1e-3


def test_batched_augmentation_is_keyed_by_seed_epoch_and_sample():
    from ovcf.data.batch_augment import BatchAugment

    spec = OmegaConf.to_container(compose_cfg("train", []).data.augment, resolve=True)
    aug = BatchAugment(spec, seed=1)
    x = torch.stack([_cube(seed=s)["image"].data for s in range(4)])
    whole, _ = aug(x, [10, 11, 12, 13], [3, 3, 3, 3])
    again, _ = aug(x, [10, 11, 12, 13], [3, 3, 3, 3])
    alone, _ = aug(x[2:3], [12], [3])  # the same sample in another batch (another DDP rank, a resume)
    assert torch.equal(whole, again) and torch.allclose(whole[2:3], alone, atol=1e-6)
    later, _ = aug(x, [10, 11, 12, 13], [4, 4, 4, 4])
    other, _ = BatchAugment(spec, seed=2)(x, [10, 11, 12, 13], [3, 3, 3, 3])
    for changed in (later, other):
        assert all(not torch.allclose(changed[i], whole[i], atol=1e-4) for i in range(4))


def test_a_slab_comes_out_as_the_whole_cube_makes_it():
    """A 2.5D network reads a slab of X rows; augmenting only that slab (sampled from the whole cube,
    widened by the kernel's reach) gives those rows as the whole cube's pipeline does, the others 0.
    The noise alone is drawn on the slab: the same SD and grain, another draw."""
    from ovcf.data.batch_augment import BatchAugment

    spec = OmegaConf.to_container(compose_cfg("train", []).data.augment, resolve=True)
    noise = spec.pop("RandomCorrelatedNoise")
    spec["RandomAffine"]["p"] = spec["RandomKernel"]["p"] = 0.5  # samples that skip the cut's transform
    mask = (_cube(noise=0.0)["image"].data > 0.5).to(torch.uint8)[None].repeat(6, 1, 1, 1, 1)
    x = torch.stack([_cube(seed=s)["image"].data for s in range(6)])
    aug, index, epoch = BatchAugment(spec, seed=3), list(range(6)), [2] * 6
    assert aug.plan((9, 14), 24)[-1] == (9, 14, 24) and aug.plan((9, 14), 24)[2] == (6, 17, 24)  # kernel reach 3
    whole, whole_mask = aug(x, index, epoch, mask)
    slab, slab_mask = aug(x, index, epoch, mask, reads=(9, 14))
    assert torch.allclose(slab[:, :, 9:14], whole[:, :, 9:14], atol=1e-6)
    assert torch.equal(slab_mask[:, :, 9:14], whole_mask[:, :, 9:14])
    assert slab[:, :, :9].abs().max() == 0 and slab[:, :, 14:].abs().max() == 0 and slab_mask[:, :, 14:].max() == 0
    assert not torch.allclose(whole[:, :, 9:14], x[:, :, 9:14], atol=1e-3)  # and it did augment

    alone = BatchAugment({"RandomCorrelatedNoise": noise | {"grain": [1.5, 1.5]}}, seed=3)
    flat = torch.full((6, 1, 24, 24, 24), 0.4)
    drawn = alone.draw(index, epoch)[0][:, 0]  # SD per sample, in window units
    slab_noise = alone(flat, index, epoch, reads=(9, 14))[0][:, :, 9:14] - 0.4
    whole_noise = alone(flat, index, epoch)[0][:, :, 9:14] - 0.4
    sd = slab_noise.flatten(1).std(1).double()
    assert torch.allclose(sd, drawn, rtol=1e-3)
    assert abs(_correlation_length(slab_noise[:, 0]) - _correlation_length(whole_noise[:, 0])) <= 1


def test_batched_geometry_moves_the_mask_with_the_image():
    from ovcf.data.batch_augment import BatchAugment

    mask = (_cube(noise=0.0)["image"].data > 0.5).to(torch.uint8)[None].repeat(8, 1, 1, 1, 1)
    image = 0.2 + 0.5 * mask.float()
    spec = {"RandomFlip": {"axes": [0]}, "RandomAffine": {"scales": 0.1, "degrees": 20, "translation": 4}}
    out, moved = BatchAugment(spec, seed=0)(image, list(range(8)), [0] * 8, mask)
    assert moved.dtype == torch.uint8 and not torch.equal(moved, mask)
    found = out > 0.45
    dice = 2 * (found & moved.bool()).sum() / (found.sum() + moved.sum())
    assert dice > 0.95
    # The flip and the affine resample once, their maps composed: as one pass after the other.
    aug = BatchAugment(spec, seed=0)
    img, msk = image, mask
    for t, params in zip(aug.transforms, aug.draw(list(range(8)), [0] * 8)):
        img, msk = t(img, params[:, :-1], msk)
    assert torch.allclose(out, img, atol=1e-5) and float((moved != msk).float().mean()) < 1e-3


def test_engine_follows_the_config():
    from ovcf.data.batch_augment import BatchAugment

    with pytest.raises(ConfigError, match=r"data\.augment\.RandomNoise.*augment_engine=torchio"):
        BatchAugment({"RandomNoise": {}})
    with pytest.raises(ConfigError, match=r"data\.augment\.RandomAffine has no argument shear"):
        BatchAugment({"RandomAffine": {"shear": 3}})
    with pytest.raises(ConfigError, match=r"data\.augment\.RandomKernel\.sigma"):
        BatchAugment({"RandomKernel": {"sigma": [1.0, 0.5]}})
    cfg = compose_cfg("train", ["data/augment=torchio"]).data
    assert cfg.augment_engine == "torchio" and set(cfg.augment) == set(DEFAULT)


def test_datamodule_augments_training_batches_after_the_transfer(tiny_cohort):
    import lightning as L

    from ovcf.data import CohortDataModule
    from ovcf.data.datamodule import VertebraDataset

    spec = OmegaConf.to_container(compose_cfg("train", []).data.augment, resolve=True)
    dm = CohortDataModule(str(tiny_cohort), 16, 2.0, WINDOW, augment=spec, in_channels=2, batch_size=4, seed=0)
    assert dm.batch_augment is not None and dm.augment is None  # auto: the batched engine knows them all
    rows = [
        {"pseudonym": f"P{i}", "level": "L1", "label": "acute", "age": 70.0, "sex": "F", "dxa_t_score": -2.5} for i in range(8)
    ]
    images = np.stack([_cube(seed=i)["image"].data[0, 4:20, 4:20, 4:20].numpy() * 1500 - 250 for i in range(8)])
    dm.datasets = {"train": VertebraDataset(rows, images, (images > 300).astype(np.uint8), WINDOW)}  # no mask channel yet
    dm.trainer = L.Trainer(logger=False)
    loaded = next(iter(dm.train_dataloader()))
    assert loaded["image"].shape == (4, 1, 16, 16, 16) and loaded["epoch"].tolist() == [0] * 4
    dm.trainer.training = True
    out = dm.on_after_batch_transfer(dict(loaded), 0)
    assert out["image"].shape == (4, 2, 16, 16, 16)  # the mask channel joins after the augmentation
    assert not torch.allclose(out["image"][:, :1], loaded["image"], atol=1e-3)
    assert torch.equal(out["image"][:, 1:], out["mask"].float()) and set(out["mask"].unique().tolist()) <= {0, 1}
    assert torch.equal(dm.on_after_batch_transfer(dict(loaded), 0)["image"], out["image"])  # keyed, not drawn anew
    dm.trainer.validating = True
    assert dm.on_after_batch_transfer(dict(loaded), 0)["image"] is loaded["image"]  # validation: untouched

    basic = OmegaConf.to_container(compose_cfg("train", ["data/augment=basic"]).data.augment, resolve=True)
    other = CohortDataModule(str(tiny_cohort), 16, 2.0, WINDOW, augment=basic)
    assert other.batch_augment is None and other.augment is not None  # torchio, per sample in the loader
    with pytest.raises(ConfigError, match=r"data\.augment\.RandomAnisotropy has no batched version"):
        CohortDataModule(str(tiny_cohort), 16, 2.0, WINDOW, augment=basic, augment_engine="batch")
    with pytest.raises(ConfigError, match="augment_engine='gpu'"):
        CohortDataModule(str(tiny_cohort), 16, 2.0, WINDOW, augment=spec, augment_engine="gpu")
