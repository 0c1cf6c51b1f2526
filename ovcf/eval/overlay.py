"""Predicted vs true vertebral levels drawn on a sagittal CT slice, for W&B and for a person to check."""

from __future__ import annotations

import numpy as np

from ovcf.contract import LEVEL_IDS


def _colours() -> np.ndarray:
    """One colour per VerSe id; neighbouring levels differ strongly so a shifted count is visible at a glance."""
    import matplotlib

    cmap = matplotlib.colormaps["tab10"]
    lut = np.zeros((max(LEVEL_IDS.values()) + 1, 3))
    for verse in LEVEL_IDS.values():
        lut[verse] = cmap(verse % 10)[:3]
    return lut


def overlay(image: np.ndarray, truth: np.ndarray, pred: np.ndarray, alpha: float = 0.45) -> np.ndarray:
    """Three panels (CT, truth, prediction) of the sagittal slice through the spine's middle, RGB uint8.

    Args:
        image: (X, Y, Z) CT scaled to 0..1, RAS (X left-right, Y posterior-anterior, Z caudal-cranial).
        truth: (X, Y, Z) VerSe ids.
        pred: (X, Y, Z) VerSe ids.
    """
    where = np.nonzero(truth if truth.any() else pred)
    x = int(np.median(where[0])) if len(where[0]) else image.shape[0] // 2
    # rows cranial first, columns anterior first: the radiologist's sagittal view
    ct = np.clip(image[x].T[::-1, ::-1], 0, 1)
    grey = np.repeat(ct[..., None], 3, axis=2)
    lut = _colours()
    panels = [grey]
    for labels in (truth, pred):
        ids = labels[x].T[::-1, ::-1]
        colour = lut[np.clip(ids, 0, len(lut) - 1)]
        mixed = np.where(ids[..., None] > 0, (1 - alpha) * grey + alpha * colour, grey)
        panels.append(mixed)
    gap = np.ones((ct.shape[0], 2, 3))
    return (np.concatenate([panels[0], gap, panels[1], gap, panels[2]], axis=1) * 255).astype(np.uint8)
