"""The overlay shows CT, truth and prediction side by side, coloured per level, in the radiologist's sagittal view."""

from __future__ import annotations

import numpy as np

from ovcf.eval.overlay import overlay


def test_three_panels_coloured_where_the_labels_are():
    image = np.zeros((20, 30, 40), np.float32)
    truth = np.zeros(image.shape, np.int64)
    truth[8:12, 5:15, 30:38] = 20  # L1: cranial (high z) and posterior (low y)
    pred = np.zeros_like(truth)
    rgb = overlay(image, truth, pred)
    assert rgb.shape == (40, 3 * 30 + 4, 3) and rgb.dtype == np.uint8
    ct, gt, pr = rgb[:, :30], rgb[:, 32:62], rgb[:, 64:]
    assert ct.max() == 0 and pr.max() == 0  # black CT, empty prediction: nothing drawn
    painted = gt.any(axis=2)
    rows, cols = np.nonzero(painted)
    assert set(rows) == set(range(2, 10))  # rows are cranial first: z 30..37 -> rows 9..2
    assert set(cols) == set(range(15, 25))  # columns are anterior first: y 5..14 -> columns 24..15
