"""Acute-vs-chronic classifiers. Every network takes the ROI cube (B, C, X, Y, Z) and returns one logit.

2D networks see it as 2.5D: a few sagittal slices through the body stacked as channels, which is
how radiologists read a compression fracture (height loss, endplates, band under the endplate).
Nothing is ever downloaded: `pretrained` needs `weights`, a local file.
"""

from __future__ import annotations

from pathlib import Path

import timm
import torch
from monai.networks.nets import DenseNet121
from torch import nn

from ovcf.errors import ConfigError
from ovcf.models.registry import register_model


class SagittalStack(nn.Module):
    """Feeds `n_slices` sagittal planes, `slice_step` voxels apart around the centre, to a 2D net."""

    def __init__(self, net: nn.Module, n_slices: int, slice_step: int):
        super().__init__()
        self.net, self.n_slices, self.slice_step = net, n_slices, slice_step

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        centre = x.shape[2] // 2
        idx = centre + self.slice_step * (torch.arange(self.n_slices, device=x.device) - self.n_slices // 2)
        planes = x.index_select(2, idx.clamp(0, x.shape[2] - 1))  # (B, C, n, Y, Z)
        return self.net(planes.flatten(1, 2))


def _weights_file(weights: str | None, pretrained: bool) -> Path | None:
    if weights is None:
        if pretrained:
            raise ConfigError(
                "pretrained=true needs model.model_kwargs.weights=PATH to a local weight file (nothing is downloaded)"
            )
        return None
    path = Path(weights).expanduser()
    if not path.is_file():
        raise ConfigError(
            f"weight file {path} not found: set model.model_kwargs.weights to a local timm/torchvision/MONAI checkpoint"
        )
    return path


def timm_2d(name: str, in_chans: int, num_outputs: int, pretrained: bool, weights: str | None, **kwargs) -> nn.Module:
    """A timm network; local weights are loaded by timm, which adapts the first conv to `in_chans`."""
    path = _weights_file(weights, pretrained)
    if path is None:
        return timm.create_model(name, pretrained=False, in_chans=in_chans, num_classes=num_outputs, **kwargs)
    return timm.create_model(
        name, pretrained=True, pretrained_cfg_overlay={"file": str(path)}, in_chans=in_chans, num_classes=num_outputs, **kwargs
    )


def load_matching(model: nn.Module, path: Path) -> nn.Module:
    """Loads the tensors of a local checkpoint whose names and shapes match (heads differ)."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    state = state.get("state_dict", state) if isinstance(state, dict) else state
    own = model.state_dict()
    usable = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    if not usable:
        raise ConfigError(f"no tensor of {path} matches the model's layers: is it a checkpoint of this architecture?")
    model.load_state_dict(usable, strict=False)
    return model


@register_model("densenet121")
def densenet121(
    in_channels: int = 1,
    n_slices: int = 5,
    slice_step: int = 2,
    num_outputs: int = 1,
    pretrained: bool = False,
    weights: str | None = None,
) -> nn.Module:
    """timm DenseNet-121 on 2.5D sagittal slices."""
    net = timm_2d("densenet121", n_slices * in_channels, num_outputs, pretrained, weights)
    return SagittalStack(net, n_slices, slice_step)


@register_model("densenet121_3d")
def densenet121_3d(
    in_channels: int = 1,
    num_outputs: int = 1,
    spatial_dims: int = 3,
    pretrained: bool = False,
    weights: str | None = None,
) -> nn.Module:
    """MONAI DenseNet-121 on the whole ROI cube."""
    path = _weights_file(weights, pretrained)
    net = DenseNet121(spatial_dims=spatial_dims, in_channels=in_channels, out_channels=num_outputs)
    return load_matching(net, path) if path is not None else net
