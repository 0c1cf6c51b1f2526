"""The column finder: a wide scan is read in a window around the spine, not around the organs or the pelvis."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import torch
from conftest import EXAMPLE_BODIES, EXAMPLE_CT, needs_example_ct
from scipy import ndimage

from ovcf.data.roi import window_hu
from ovcf.data.spine import spine_window
from ovcf.tasks.segmentation import SegmentationTask

WINDOW = (-250.0, 1250.0)


def torso(shape=(180, 150, 60), column=(97, 100), spacing=2.0) -> np.ndarray:
    """A 360 x 300 mm fat torso (HU, RAS: Y grows anteriorly) with a bone column off the centre, two iliac wings
    that hold more bone than the column, a thin sternum on the midline and dense contrast in a bowel loop."""
    x, y = np.meshgrid(np.arange(shape[0]), np.arange(shape[1]), indexing="ij")
    cx, cy = (shape[0] - 1) / 2, (shape[1] - 1) / 2
    hu = np.full(shape, -1000.0, np.float32)
    hu[((x - cx) / 85) ** 2 + ((y - cy) / 70) ** 2 < 1] = -100.0
    body = ((x - column[0]) / 12) ** 2 + ((y - column[1] + 10) / 10) ** 2 < 1  # a vertebral body ...
    arch = ((x - column[0]) / 10) ** 2 + ((y - column[1]) / 4) ** 2 < 1  # ... and its posterior arch behind it
    hu[body | arch] = 400.0
    for side in (-1, 1):  # iliac wings: lateral plates, bone over 40 of the 60 slices, more of it than the column
        wing = (np.abs(x - cx - side * 60) < 8) & (np.abs(y - column[1] - 5) < 35)
        hu[wing, :40] = 600.0
    hu[(np.abs(x - cx) < 4) & (np.abs(y - cy - 62) < 2)] = 500.0  # the sternum, anterior on the midline
    hu[((x - cx + 20) / 8) ** 2 + ((y - cy - 20) / 8) ** 2 < 1, 10:50] = 300.0  # contrast in bowel
    return hu


def test_the_window_is_centred_on_the_column_not_on_more_bone_elsewhere():
    hu = torso()
    sx, sy = spine_window(window_hu(hu, WINDOW), (2.0, 2.0, 2.0), WINDOW, 160.0)
    assert (sx.stop - sx.start, sy.stop - sy.start) == (80, 80)  # 160 mm at 2 mm
    centre = np.array([(sx.start + sx.stop) / 2, (sy.start + sy.stop) / 2])
    assert np.abs(centre - (97, 95)).max() <= 6, centre  # the body and its arch: within 12 mm
    # A column further forward and to the side moves the window with it.
    sx, sy = spine_window(window_hu(torso(column=(85, 80)), WINDOW), (2.0, 2.0, 2.0), WINDOW, 160.0)
    assert abs((sx.start + sx.stop) / 2 - 85) <= 6 and abs((sy.start + sy.stop) / 2 - 75) <= 6


def test_a_scan_no_wider_than_the_window_is_read_whole():
    hu = torso()[50:130, 40:110]  # 160 x 140 mm
    assert spine_window(window_hu(hu, WINDOW), (2.0, 2.0, 2.0), WINDOW, 160.0) == (slice(0, 80), slice(0, 70))
    empty = np.zeros((120, 120, 10), np.float32)  # air only: nothing to centre on
    assert spine_window(empty, (2.0, 2.0, 2.0), WINDOW, 160.0) == (slice(0, 120), slice(0, 120))


def test_the_segmenter_reads_the_window_and_calls_the_rest_background():
    torch.manual_seed(0)
    task = SegmentationTask(model_kwargs={"filters": [4, 8, 16], "strides": [1, 2, 2]}, patch_size=(32, 32, 16))
    task.eval()
    image = torch.from_numpy(window_hu(torso(), WINDOW))[None, None]
    with torch.no_grad():
        logits, slices = task.read_volumes(image, torch.tensor([[2.0, 2.0, 2.0]]))
        sx, sy = task.window(image[0, 0], (2.0, 2.0, 2.0))
        inside = task.sliding_window(image[:, :, sx, sy])
        whole, _ = task.read_volumes(image)  # no spacing: the whole plane
    assert torch.equal(logits[:, :, sx, sy], inside) and slices.shape == (1, 60)
    outside = torch.ones(image.shape[2:4], dtype=torch.bool)
    outside[sx, sy] = False
    assert bool((logits[0, 0][outside] > logits[0, 1][outside]).all())
    assert whole.shape == logits.shape and not torch.equal(whole, logits)


@needs_example_ct
def test_on_a_real_abdominal_ct_the_window_holds_every_vertebral_body():
    """TotalSegmentator's example_ct (366 x 303 mm, T11 to the sacrum, with bowel, kidneys and iliac wings)."""
    ct = nib.load(EXAMPLE_CT)
    bodies = nib.load(EXAMPLE_BODIES)
    assert nib.aff2axcodes(ct.affine) == ("R", "A", "S") and np.allclose(ct.affine, bodies.affine)
    for spacing in (3.0, 2.0):
        hu = ndimage.zoom(ct.get_fdata().astype(np.float32), 3.0 / spacing, order=1)
        truth = ndimage.zoom(np.asarray(bodies.dataobj) > 0, 3.0 / spacing, order=0)
        sx, sy = spine_window(window_hu(hu, WINDOW), (spacing,) * 3, WINDOW, 160.0)
        assert sx.stop - sx.start < hu.shape[0] and sy.stop - sy.start < hu.shape[1]
        assert truth[sx, sy].sum() == truth.sum(), spacing
        # The bodies lie in the window's middle, not at an edge it happened to reach.
        centre = np.argwhere(truth).mean(0)[:2]
        assert np.abs(centre - [(sx.start + sx.stop) / 2, (sy.start + sy.stop) / 2]).max() * spacing < 30
