"""Which spine region (cervical, thoracic, lumbar) an axial slab of CT lies in: the cue the level count anchors on.

A thoracic vertebra is the one with ribs beside it; lumbar ones have psoas muscles and transverse processes instead.
Those signs lie across the whole axial slice, centimetres from the body, so one small 2D network that pools over a
thin slab sees them directly. Asking the 3D segmenter to carry the same cue into every body voxel proved fragile:
in default-settings runs U-Mamba's thoracic class collapsed into lumbar and never came back, while U-Net, from the
same data, learned it. With this head every segmenter only has to find bodies, and all share one way of naming them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def axial_slabs(image: torch.Tensor, slab: int) -> torch.Tensor:
    """Every axial slab of `slab` slices, centred on each slice: (B, 1, X, Y, Z) -> (B * Z, slab, X, Y).

    The volume's first and last slices are repeated at its ends, so every slice gets a full slab.
    """
    half = slab // 2
    padded = F.pad(image, (half, slab - 1 - half, 0, 0, 0, 0), mode="replicate")[:, 0]  # (B, X, Y, Z + slab - 1)
    slabs = padded.unfold(3, slab, 1)  # (B, X, Y, Z, slab)
    return slabs.permute(0, 3, 4, 1, 2).reshape(-1, slab, *image.shape[2:4])


def slice_regions(label: torch.Tensor, min_voxels: int) -> torch.Tensor:
    """Region class of each axial slice, (B, 1, X, Y, Z) region map -> (B * Z,), 0-based over the regions.

    A slice's region is the one most of its body voxels carry; slices with fewer than `min_voxels` body voxels
    (discs, the rim of a body) get -100, which cross-entropy ignores.
    """
    label = label[:, 0].long()
    counts = torch.stack([(label == c).sum((1, 2)) for c in range(1, int(label.max().clamp_min(1)) + 1)], -1)
    region = counts.argmax(-1)
    region[counts.sum(-1) < min_voxels] = -100
    return region.reshape(-1)


class SliceRegionNet(nn.Module):
    """A small 2D CNN: an axial slab (slab slices as channels) in, region logits out.

    Strided convolutions and global average and max pooling make it take any in-plane size, so a phantom's 128 mm
    field of view and a clinical 400 mm one go through the same weights.

    Args:
        in_channels: slices per slab.
        out_channels: regions (C, T, L).
        features: channels of the strided conv stages; each halves the slab in-plane.
    """

    def __init__(self, in_channels: int = 5, out_channels: int = 3, features: tuple[int, ...] = (16, 32, 64, 64)):
        super().__init__()
        layers, ch = [], in_channels
        for f in features:
            layers += [
                nn.Conv2d(ch, f, 3, stride=2, padding=1, bias=False),
                nn.InstanceNorm2d(f, affine=True),
                nn.LeakyReLU(0.01, inplace=True),
            ]
            ch = f
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(2 * ch, out_channels)

    def forward(self, slabs: torch.Tensor) -> torch.Tensor:
        f = self.features(slabs)
        return self.head(torch.cat([f.mean((2, 3)), f.amax((2, 3))], 1))
