"""Vertebra segmenters and the class <-> level <-> VerSe id mappings they are trained with.

One class per vertebral level (background 0, then the levels in cranio-caudal order) lets the network name each
vertebra itself: the `segment` command then writes VerSe ids straight from the argmax, with no separate
labelling step that could shift every level by one.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from monai.networks.nets import DynUNet
from torch import nn

from ovcf.contract import LEVEL_IDS, LEVEL_ORDER
from ovcf.errors import ConfigError
from ovcf.models.registry import register_model

# DynUNet arguments that `unet` passes through unchanged; anything else is a config typo.
_DYNUNET_EXTRAS = ("kernel_size", "upsample_kernel_size", "dropout", "norm_name", "act_name", "res_block", "deep_supr_num")


def level_classes(levels: Sequence[str] | None = None) -> list[str]:
    """The levels a segmenter predicts, in cranio-caudal order; class i + 1 is the i-th of them, 0 is background.

    The order is fixed by `LEVEL_ORDER` rather than by the caller, so `["L2", "L1"]` and `["L1", "L2"]` give the same
    classes and a checkpoint's class indices never depend on how a config happened to list them.

    Args:
        levels: level names such as "L1"; None for every level in `LEVEL_ORDER` (C1..L6 with T13).

    Raises:
        ConfigError: an unknown or repeated level, or an empty list.
    """
    if levels is None:
        return list(LEVEL_ORDER)
    if isinstance(levels, str):
        levels = [levels]
    names = [str(level) for level in levels]
    unknown = sorted(set(names) - set(LEVEL_ORDER))
    if unknown:
        raise ConfigError(f"unknown level(s) {unknown}; levels are named {', '.join(LEVEL_ORDER)}")
    if len(set(names)) != len(names):
        raise ConfigError(f"levels {names} name a level twice; list each level once")
    if not names:
        raise ConfigError("levels is empty; name at least one level, e.g. ['L1'], or leave it unset for all levels")
    return [level for level in LEVEL_ORDER if level in names]


def class_to_verse(levels: Sequence[str] | None = None) -> list[int]:
    """VerSe id of every class index: entry 0 is background (0), entry i + 1 the id of `level_classes(levels)[i]`."""
    return [0, *(LEVEL_IDS[level] for level in level_classes(levels))]


def verse_to_class(levels: Sequence[str] | None = None) -> dict[int, int]:
    """Class index of every VerSe id the segmenter predicts (0 -> 0); ids of other levels are absent (see `encode_verse`)."""
    return {verse: c for c, verse in enumerate(class_to_verse(levels))}


def encode_verse(mask: torch.Tensor, levels: Sequence[str] | None = None) -> torch.Tensor:
    """A VerSe-labelled mask as class indices; vertebrae of levels not in `levels` become background.

    Levels outside the list are background rather than an error so that a model of the lumbar spine can be trained on
    whole-spine masks: those voxels are simply not what it was asked to find.
    """
    mask = mask.long()
    if mask.numel() and int(mask.min()) < 0:
        raise ValueError(f"mask holds negative label {int(mask.min())}; VerSe ids are >= 0")
    lut = torch.zeros(max(int(mask.max()) if mask.numel() else 0, max(LEVEL_IDS.values())) + 1, dtype=torch.long)
    for verse, c in verse_to_class(levels).items():
        lut[verse] = c
    return lut.to(mask.device)[mask]


def decode_classes(classes: torch.Tensor, levels: Sequence[str] | None = None) -> torch.Tensor:
    """Class indices (e.g. an argmax) as VerSe ids; the inverse of `encode_verse` on the levels kept."""
    lut = torch.tensor(class_to_verse(levels), dtype=torch.long, device=classes.device)
    return lut[classes.long()]


@register_model("unet", task="segmentation")
def unet(
    in_channels: int = 1,
    out_channels: int = 2,
    spatial_dims: int = 3,
    filters: Sequence[int] = (16, 32, 64, 128, 256),
    strides: Sequence[int] = (1, 2, 2, 2, 2),
    deep_supervision: bool = False,
    **kwargs,
) -> nn.Module:
    """A residual nnU-Net-style U-Net (MONAI `DynUNet`), small enough to train on a CPU with the default filters.

    nnU-Net's 3d_fullres uses 32..320 filters and six stages; (16, 32, 64, 128, 256) halves the widths and drops a stage
    so 64^3 patches train on a laptop, and is still what the task's tests learn from. Kernels are 3 at every stage and
    each upsampling undoes its stage's stride, so spatial sizes must be divisible by the product of `strides` (16 by
    default), which sliding-window inference guarantees by feeding patch-sized windows.

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
