"""The slab region classifier's inputs and targets: slabs centred on their slice, regions by majority of body voxels."""

from __future__ import annotations

import torch

from ovcf.models.regions import SliceRegionNet, axial_slabs, slice_regions


def test_axial_slabs_are_centred_and_padded_at_the_ends():
    z = torch.arange(6, dtype=torch.float32)
    image = z.view(1, 1, 1, 1, 6).expand(2, 1, 3, 4, 6).clone()  # every slice holds its own index
    image[1] += 100
    slabs = axial_slabs(image, 5)
    assert slabs.shape == (2 * 6, 5, 3, 4)
    assert slabs[2, :, 0, 0].tolist() == [0, 1, 2, 3, 4]  # slice 2 of volume 0, centred
    assert slabs[0, :, 0, 0].tolist() == [0, 0, 0, 1, 2]  # the first slice repeated above the volume
    assert slabs[6 + 5, :, 0, 0].tolist() == [103, 104, 105, 105, 105]  # volume 1, last slice
    assert axial_slabs(image, 1)[:, 0].equal(image[:, 0].permute(0, 3, 1, 2).reshape(-1, 3, 4))


def test_slice_regions_take_the_majority_and_ignore_thin_slices():
    label = torch.zeros(1, 1, 4, 4, 3, dtype=torch.long)
    label[0, 0, :, :3, 0] = 2  # 12 thoracic voxels
    label[0, 0, :, 3, 0] = 3  # 4 lumbar ones: the slice is thoracic
    label[0, 0, :2, :, 1] = 3  # 8 lumbar voxels
    label[0, 0, 0, 0, 2] = 1  # one cervical voxel: too few to teach anything
    assert slice_regions(label, min_voxels=5).tolist() == [1, 2, -100]
    assert slice_regions(label, min_voxels=1).tolist() == [1, 2, 0]
    assert slice_regions(torch.zeros(1, 1, 2, 2, 2, dtype=torch.long), 1).tolist() == [-100, -100]


def test_slice_region_net_takes_any_field_of_view():
    net = SliceRegionNet(in_channels=5, out_channels=3)
    for size in ((64, 64), (200, 173)):
        assert net(torch.randn(2, 5, *size)).shape == (2, 3)
