"""The U-Net segmenter (MONAI's DynUNet), registered as "unet"; UNETR++ and U-Mamba live in their own modules.

Every segmenter maps one CT channel to per-voxel class logits at the input's size; `ovcf.tasks.SegmentationTask`
asks for two classes (background, vertebral body) and names the levels by counting (`ovcf.data.instances`). Each
registers the patch sizes it accepts (`input_size`), so a patch that does not suit it fails when the task is built,
naming the rule, not at the first forward pass.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from monai.networks.nets import DynUNet
from torch import nn

from ovcf.errors import ConfigError
from ovcf.models.registry import check_divisible, register_model

# DynUNet arguments that `unet` passes through unchanged; anything else is a config typo.
_DYNUNET_EXTRAS = ("kernel_size", "upsample_kernel_size", "dropout", "norm_name", "act_name", "res_block", "deep_supr_num")
STRIDES = (1, 2, 2, 2, 2)


def fit_to_patch(kwargs: dict, patch_size: list[int]) -> dict:
    """U-Net's input-size rule (see `ovcf.models.registry.register_model`): every axis of the patch a multiple of the
    product of `strides`, since a stride-2 stage rounds an odd size up and its upsampling then misses the skip."""
    try:
        strides = [int(s) for s in kwargs.get("strides", STRIDES)]
    except (TypeError, ValueError):
        return kwargs  # the factory names the bad strides
    check_divisible(patch_size, math.prod(strides), f"the product of unet strides {strides}: each stage halves it exactly")
    return kwargs


@register_model("unet", task="segmentation", input_size=fit_to_patch)
def unet(
    in_channels: int = 1,
    out_channels: int = 2,
    spatial_dims: int = 3,
    filters: Sequence[int] = (16, 32, 64, 128, 256),
    strides: Sequence[int] = STRIDES,
    deep_supervision: bool = False,
    **kwargs,
) -> nn.Module:
    """A residual nnU-Net-style U-Net (MONAI `DynUNet`), small enough to train on a CPU with the default filters.

    nnU-Net's 3d_fullres uses 32..320 filters and six stages; (16, 32, 64, 128, 256) halves the widths and drops a stage
    so 64^3 patches train on a laptop, and is still what the task's tests learn from. Kernels are 3 at every stage and
    each upsampling undoes its stage's stride, so spatial sizes must be divisible by the product of `strides` (16 by
    default), which sliding-window inference guarantees by feeding patch-sized windows (`fit_to_patch` checks the patch).

    Args:
        in_channels: input channels (CT: 1).
        out_channels: classes, background included; the network returns logits.
        spatial_dims: 3 for volumes (2 for slices).
        filters: channels per stage, one per stride.
        strides: downsampling per stage; the first is normally 1 (full-resolution stage).
        deep_supervision: in training mode return the full-resolution logits and the upsampled logits of
            `deep_supr_num` coarser decoder stages stacked on dim 1, as DynUNet does; eval mode returns one tensor.
        **kwargs: passed to `DynUNet`: kernel_size, upsample_kernel_size, dropout, norm_name, act_name, res_block,
            deep_supr_num. Anything else is reported as a config typo.

    Raises:
        ConfigError: unknown keyword arguments, or `filters` and `strides` of different lengths.
    """
    unknown = sorted(set(kwargs) - set(_DYNUNET_EXTRAS))
    if unknown:
        raise ConfigError(f"unet got unknown argument(s) {unknown}; besides its own it takes {', '.join(_DYNUNET_EXTRAS)}")
    filters, strides = [int(f) for f in filters], [int(s) for s in strides]
    if len(filters) != len(strides) or len(strides) < 2:
        raise ConfigError(
            f"unet needs one filter count per stride and at least 2 stages; got filters {filters}, strides {strides}"
        )
    options = {"norm_name": "instance", "res_block": True, **kwargs}
    kernel_size = options.pop("kernel_size", [3] * len(strides))
    upsample_kernel_size = options.pop("upsample_kernel_size", strides[1:])
    return DynUNet(
        spatial_dims=spatial_dims,
        in_channels=in_channels,
        out_channels=out_channels,
        kernel_size=kernel_size,
        strides=strides,
        upsample_kernel_size=upsample_kernel_size,
        filters=filters,
        deep_supervision=deep_supervision,
        **options,
    )
