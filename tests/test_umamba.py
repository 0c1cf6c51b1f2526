"""U-Mamba: the fast scan against the step-by-step recurrence, shapes, errors, and that it learns."""

from __future__ import annotations

import itertools

import pytest
import torch
from conftest import fit_losses

from ovcf.errors import ConfigError
from ovcf.models.registry import create_model, fit_to_patch
from ovcf.models.umamba import UMamba, selective_scan, selective_scan_reference

SMALL = (8, 16, 32, 64)


def _scan_inputs(with_d: bool, with_z: bool, with_bias: bool, softplus: bool, length: int = 37, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    b, d, n = 2, 4, 3

    def rand(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    delta = rand(b, d, length) if softplus else torch.rand(b, d, length, generator=g, dtype=torch.float64)
    args = {"u": rand(b, d, length), "delta": delta, "A": -torch.rand(d, n, generator=g, dtype=torch.float64) * 3}
    args |= {"B": rand(b, n, length), "C": rand(b, n, length)}
    if with_d:
        args["D"] = rand(d)
    if with_z:
        args["z"] = rand(b, d, length)
    if with_bias:
        args["delta_bias"] = rand(d)
    return {k: v.requires_grad_() for k, v in args.items()}


@pytest.mark.parametrize("chunk_size", [4, 16, None])
@pytest.mark.parametrize("with_d,with_z,with_bias,softplus", list(itertools.product([False, True], repeat=4)))
def test_selective_scan_matches_reference(chunk_size, with_d, with_z, with_bias, softplus):
    """L = 37 is no multiple of any chunk size; chunk 4 takes two recursion levels (37 -> 10 chunks -> 3), None the default."""
    args = _scan_inputs(with_d, with_z, with_bias, softplus)
    chunk = {} if chunk_size is None else {"chunk_size": chunk_size}
    fast = selective_scan(**args, delta_softplus=softplus, **chunk)
    ref = selective_scan_reference(**args, delta_softplus=softplus)
    assert fast.shape == ref.shape == args["u"].shape
    torch.testing.assert_close(fast, ref, atol=1e-6, rtol=1e-6)

    weights = torch.randn(ref.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    inputs = list(args.values())
    grads_fast = torch.autograd.grad((fast * weights).sum(), inputs)
    grads_ref = torch.autograd.grad((ref * weights).sum(), inputs)
    for name, g_fast, g_ref in zip(args, grads_fast, grads_ref):
        torch.testing.assert_close(g_fast, g_ref, atol=1e-6, rtol=1e-6, msg=lambda m, name=name: f"grad {name}: {m}")


def test_selective_scan_stiff_float32():
    """Strong decays (delta * A down to about -100 per step) must neither overflow nor drift in float32."""
    args = {k: v.detach().float() for k, v in _scan_inputs(True, True, True, True, length=300).items()}
    args["delta"], args["A"] = args["delta"] + 4, args["A"] * 5
    fast = selective_scan(**args)
    assert torch.isfinite(fast).all()
    torch.testing.assert_close(fast, selective_scan_reference(**args), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("variant", ["bot", "enc"])
def test_output_shape(variant):
    torch.manual_seed(0)
    net = UMamba(in_channels=1, out_channels=3, features=SMALL, variant=variant).eval()
    with torch.no_grad():
        assert net(torch.randn(1, 1, 32, 32, 32)).shape == (1, 3, 32, 32, 32)


def test_deep_supervision_returns_coarser_maps_in_training():
    net = UMamba(in_channels=1, out_channels=2, features=SMALL, deep_supervision=True)
    outs = net(torch.randn(1, 1, 16, 16, 16))
    assert [tuple(o.shape[2:]) for o in outs] == [(16, 16, 16), (8, 8, 8), (4, 4, 4)]
    assert net.eval()(torch.randn(1, 1, 16, 16, 16)).shape == (1, 2, 16, 16, 16)


def test_registered_defaults_parameter_count():
    net = create_model("umamba")
    n_params = sum(p.numel() for p in net.parameters())
    print(f"umamba defaults: {n_params:,} parameters")
    assert 10_000_000 < n_params < 12_000_000  # measured 10,839,010


def test_bad_size_names_size_and_rule():
    net = UMamba(features=SMALL)
    with pytest.raises(ConfigError, match=r"\(30, 32, 32\) is not divisible by 2\*\*\(len\(features\)-1\) = 8"):
        net(torch.randn(1, 1, 30, 32, 32))


def test_registered_rule_refuses_a_patch_the_stages_cannot_halve():
    assert fit_to_patch("umamba", {"features": [8, 16, 32]}, [36, 32, 32]) == {"features": [8, 16, 32]}
    with pytest.raises(ConfigError, match=r"patch_size \[64, 64, 40\] is not divisible by 16 \(2\*\*\(len\(features\)-1\)"):
        create_model("umamba", input_size=[64, 64, 40], features=[8, 16, 32, 64, 128])
    assert create_model("umamba", input_size=[64, 64, 32], features=[8, 16, 32, 64, 128]) is not None  # conf/model/umamba


def test_unknown_variant():
    with pytest.raises(ConfigError, match="unknown U-Mamba variant 'mid'"):
        UMamba(variant="mid")


def test_learns_a_sphere():
    torch.manual_seed(0)
    grid = torch.stack(torch.meshgrid(*[torch.arange(32.0)] * 3, indexing="ij"))
    centres = torch.tensor([[12.0, 14.0, 18.0], [19.0, 17.0, 13.0]])
    label = ((grid[None] - centres[:, :, None, None, None]).norm(dim=1, keepdim=True) < 7).float()  # (2, 1, 32, 32, 32)
    image = label + 0.5 * torch.randn_like(label)
    losses = fit_losses(UMamba(in_channels=1, out_channels=2, features=SMALL), image, label, steps=30, lr=1e-2)
    print(f"loss {losses[0]:.3f} -> {losses[-1]:.3f}")
    assert losses[-1] < 0.7 * losses[0]
