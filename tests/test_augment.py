"""Training augmentation: config names build torchio pipelines, and `RandomSharpen` acts as a sharp
reconstruction kernel does (edges and noise up, mean kept), reproducibly under a seed."""

from __future__ import annotations

import pytest
import torch
import torchio as tio
from conftest import compose_cfg
from omegaconf import OmegaConf

from ovcf.data.augment import RandomSharpen, build_augment, scale_augment
from ovcf.errors import ConfigError


def _cube(seed: int = 0) -> tio.Subject:
    """A bright ball in a noisy background (a body in soft tissue), on a 24^3 grid."""
    g = torch.Generator().manual_seed(seed)
    z, y, x = torch.meshgrid(*(torch.arange(24.0),) * 3, indexing="ij")
    ball = (((z - 12) ** 2 + (y - 12) ** 2 + (x - 12) ** 2) < 49).float() * 0.5 + 0.2
    return tio.Subject(image=tio.ScalarImage(tensor=(ball + 0.01 * torch.randn(24, 24, 24, generator=g))[None]))


def _roughness(t: torch.Tensor) -> float:
    return float((t[..., 1:] - t[..., :-1]).abs().mean())


def test_sharpen_enhances_edges_and_keeps_the_mean():
    before = _cube()["image"].data.clone()
    after = RandomSharpen(amount=(0.8, 0.8), sigma=1.0)(_cube())["image"].data
    assert _roughness(after) > 1.5 * _roughness(before)  # unsharp mask: edges and noise up
    assert after.mean().item() == pytest.approx(before.mean().item(), abs=1e-3)
    assert after.max() > before.max() and after.min() < before.min()  # overshoot at the ball's edge
    assert torch.equal(RandomSharpen(amount=(0.0, 0.0))(_cube())["image"].data, before)  # gain 0: unchanged


def test_sharpen_follows_the_seed():
    def draw(seed):
        torch.manual_seed(seed)
        return RandomSharpen(amount=0.8)(_cube())["image"].data

    assert torch.equal(draw(3), draw(3)) and not torch.equal(draw(3), draw(4))


def test_scanner_augmentation_builds_and_scales():
    spec = OmegaConf.to_container(compose_cfg("train", ["data/augment=scanners"]).data.augment, resolve=True)
    assert spec["RandomSharpen"]["amount"] == [0.0, 0.8] and spec["RandomNoise"]["mean"] == [-0.01, 0.01]
    names = [type(t).__name__ for t in build_augment(spec).transforms]
    assert names[-1] == "RandomSharpen" and "RandomFlip" in names
    double = scale_augment(spec, 2.0)
    assert double["RandomSharpen"]["amount"] == pytest.approx([0.0, 1.6])
    assert double["RandomNoise"]["mean"] == pytest.approx([-0.02, 0.02])
    out = build_augment(spec)(_cube())["image"].data
    assert out.shape == (1, 24, 24, 24) and torch.isfinite(out).all()


def test_unknown_transform_names_the_field():
    with pytest.raises(ConfigError, match=r"data\.augment\.RandomSharpness.*RandomSharpen"):
        build_augment({"RandomSharpness": {}})
