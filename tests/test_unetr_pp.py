"""UNETR++: shapes, size checks, the EPA block, and that it learns a toy segmentation on CPU."""

from __future__ import annotations

import pytest
import torch
from conftest import fit_losses

from ovcf.errors import ConfigError
from ovcf.models.registry import create_model
from ovcf.models.unetr_pp import EPA, UNETRPP, EPABlock, unetr_pp

TINY = dict(feature_size=8, depths=(1, 1, 1, 1), num_heads=4, proj_size=16)


@pytest.fixture(autouse=True)
def one_thread():
    """These convs are too small to split across threads; on a shared 2-core box two threads run 5-20x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("img_size", [(32, 32, 32), (64, 64, 32)])
@pytest.mark.parametrize("in_channels", [1, 2])
def test_output_shape_matches_input(img_size, in_channels):
    torch.manual_seed(0)
    net = unetr_pp(in_channels=in_channels, out_channels=3, img_size=img_size).eval()
    with torch.no_grad():
        y = net(torch.randn(1, in_channels, *img_size))
    assert y.shape == (1, 3, *img_size)


def test_registry_and_deep_supervision():
    net = create_model("unetr_pp", img_size=(32, 32, 32), deep_supervision=True, **TINY)
    assert isinstance(net, UNETRPP)
    outs = net.train()(torch.randn(2, 1, 32, 32, 32))
    assert [tuple(o.shape) for o in outs] == [(2, 2, 32, 32, 32), (2, 2, 8, 8, 8), (2, 2, 4, 4, 4)]
    assert net.eval()(torch.randn(1, 1, 32, 32, 32)).shape == (1, 2, 32, 32, 32)
    with pytest.raises(ConfigError, match="deep_supervison"):
        create_model("unetr_pp", deep_supervison=True)


def test_default_parameter_count():
    n = sum(p.numel() for p in unetr_pp().parameters())
    print(f"unetr_pp defaults: {n / 1e6:.2f}M parameters")
    assert 10e6 < n < 20e6  # 15.07M measured


@pytest.mark.parametrize("bad", [(96, 96, 80), (48, 64, 64), (64, 64)])
def test_bad_img_size_is_named(bad):
    with pytest.raises(ConfigError, match=r"img_size \(") as err:
        unetr_pp(img_size=bad)
    assert str(bad) in str(err.value)


def test_input_of_other_size_is_refused():
    net = unetr_pp(img_size=(32, 32, 32), **TINY)
    with pytest.raises(ConfigError, match=r"\(64, 32, 32\)"):
        net(torch.randn(2, 1, 64, 32, 32))


def test_bad_heads_and_dims():
    with pytest.raises(ConfigError, match="num_heads"):
        unetr_pp(feature_size=16, num_heads=5)
    with pytest.raises(ConfigError, match="spatial_dims"):
        unetr_pp(spatial_dims=2)


def test_epa_block_keeps_shape_and_projects_tokens():
    torch.manual_seed(0)
    grid, channels, proj = (4, 8, 8), 32, 16
    n = 4 * 8 * 8
    block = EPABlock(channels, num_tokens=n, proj_size=proj, num_heads=4)
    x = torch.randn(2, channels, *grid)
    assert block(x).shape == x.shape
    assert block.epa.token_proj.weight.shape == (proj, n)  # keys/values squeezed from N tokens to proj_size
    epa = EPA(channels, n, proj, num_heads=4)
    tokens = torch.randn(2, n, channels)
    assert epa(tokens).shape == tokens.shape
    # The stage caps proj_size at the token count: the deepest stage of a 32^3 patch has one token.
    deepest = unetr_pp(img_size=(32, 32, 32), proj_size=32).encoder[3][0].epa.token_proj
    assert deepest.weight.shape == (1, 1)


def test_learns_a_sphere():
    torch.manual_seed(0)
    size = 32
    axis = torch.arange(size, dtype=torch.float32) - size / 2
    zz, yy, xx = torch.meshgrid(axis, axis, axis, indexing="ij")
    labels, images = [], []
    for centre in ([0, 0, 0], [4, -3, 2]):
        sphere = ((zz - centre[0]) ** 2 + (yy - centre[1]) ** 2 + (xx - centre[2]) ** 2 < 8**2).float()
        labels.append(sphere[None])
        images.append((sphere + 0.5 * torch.randn_like(sphere))[None])
    x, y = torch.stack(images), torch.stack(labels)

    losses = fit_losses(unetr_pp(img_size=(size,) * 3, **TINY), x, y, steps=20, lr=3e-3)
    print(f"DiceCE {losses[0]:.3f} -> {losses[-1]:.3f}")
    assert losses[-1] < 0.7 * losses[0]


def test_task_builds_unetr_pp_for_its_patch_through_the_registered_rule():
    from ovcf.tasks.segmentation import SegmentationTask

    kwargs = dict(TINY, num_heads=2, proj_size=8)
    task = SegmentationTask("unetr_pp", kwargs, patch_size=[64, 64, 32])  # img_size unset: the patch size
    assert task.net.img_size == (64, 64, 32) and "img_size" not in task.hparams.model_kwargs
    with pytest.raises(ConfigError, match=r"img_size \[32, 32, 32\] differs from patch_size \[64, 64, 32\].*leave img_size"):
        SegmentationTask("unetr_pp", {"img_size": [32, 32, 32], **kwargs}, patch_size=[64, 64, 32])
    with pytest.raises(ConfigError, match=r"patch_size \[48, 64, 32\] does not suit UNETR\+\+.*multiples of 32"):
        SegmentationTask("unetr_pp", kwargs, patch_size=[48, 64, 32])


def test_registry_applies_a_network_s_input_size_rule():
    from ovcf.models.registry import fit_to_patch

    assert fit_to_patch("unetr_pp", {"feature_size": 8}, (32, 64, 32)) == {"feature_size": 8, "img_size": [32, 64, 32]}
    assert fit_to_patch("densenet121", {"n_slices": 3}, (48, 48, 48)) == {"n_slices": 3}  # no rule: unchanged
    assert create_model("unetr_pp", input_size=(32, 32, 32), **TINY).img_size == (32, 32, 32)
    with pytest.raises(ConfigError, match="unknown segmentation model 'unetr'"):
        fit_to_patch("unetr", {}, (32, 32, 32), task="segmentation")
