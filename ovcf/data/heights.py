"""Vertebral-body heights read from a label map: anterior, middle and posterior, and Genant's grade.

Genant's semi-quantitative reading grades a compression fracture by its height loss: grade 1 at
20-25 %, grade 2 at 25-40 %, grade 3 above 40 %. The loss is the lowest of the anterior and middle
heights against the posterior one (wedge and biconcave fractures), or of any height against the
same height of the intact neighbours (crush fractures lose the posterior wall too). Heights are
measured on the mid-sagittal strip of the body, in millimetres, so they do not depend on the
scanner's voxels.
"""

from __future__ import annotations

import numpy as np

from ovcf.contract import LEVEL_IDS

GENANT_LOSS = (0.20, 0.25, 0.40)  # lower bounds of grades 1, 2 and 3
WALLS = ("anterior", "middle", "posterior")
NAMES = {verse: level for level, verse in LEVEL_IDS.items()}


def genant_grade(loss: float) -> int:
    """0 (normal) to 3 (severe) for a fractional height loss."""
    return int(sum(loss >= bound for bound in GENANT_LOSS))


def wall_heights(body: np.ndarray, spacing) -> np.ndarray:
    """Anterior, middle and posterior height (mm) of one body mask on an RAS-ordered grid.

    Args:
        body: boolean mask indexed (left-right, posterior-anterior, inferior-superior), e.g. a box
            of a canonical CT; only the body's voxels are set.
        spacing: voxel size along those three axes, mm.

    Returns:
        The median column height in the anterior, middle and posterior third of the body's depth,
        over the central quarter of its width (the mid-sagittal strip the radiologist measures on).
    """
    spacing = np.asarray(spacing, float)
    columns = body.sum(axis=2) * spacing[2]  # height of every (x, y) column
    xs = np.nonzero(columns.any(axis=1))[0]
    if len(xs) == 0:
        return np.zeros(3)
    centre, half = (xs[0] + xs[-1]) / 2, max((xs[-1] - xs[0]) / 8, 1)
    strip = columns[int(np.floor(centre - half)) : int(np.ceil(centre + half)) + 1]
    ys = np.nonzero(strip.any(axis=0))[0]
    thirds = np.array_split(np.arange(ys[0], ys[-1] + 1), 3)  # posterior to anterior in RAS
    heights = [_height(strip[:, t][strip[:, t] > 0]) for t in thirds]
    return np.array(heights[::-1])  # anterior, middle, posterior


def _height(columns: np.ndarray) -> float:
    """The typical height of a third's columns: their mean with the lowest and highest quarter left out.

    The mean, not the median, because column heights come in whole slices: on 3 mm slices a median
    jumps by 3 mm (over 10% of a body) while a mean over columns cut at different slices does not.
    The trim keeps the rounded rim of the body and stray columns out, as the median did.
    """
    if not len(columns):
        return 0.0
    from scipy.stats import trim_mean

    return float(trim_mean(columns, 0.25))


def level_heights(labels: np.ndarray, spacing) -> dict[str, dict]:
    """Heights, ratios, height loss and Genant grade of every body of a label map (VerSe ids, RAS grid).

    A body that touches the first or last slice is cut by the scan: its heights are reported but
    flagged `cut`, not graded, and never used as a neighbour's reference.

    Returns:
        level -> {anterior_mm, middle_mm, posterior_mm, anterior_ratio, middle_ratio (to the
        posterior height), neighbour_ratio (lowest height over the intact neighbours' same height,
        or None), height_loss, genant_grade, cut}.
    """
    from scipy import ndimage

    spacing = np.asarray(spacing, float)
    labels = np.asarray(labels)
    boxes = ndimage.find_objects(labels.astype(np.int32))
    measured = {}
    for index, box in enumerate(boxes, start=1):
        if box is None or index not in NAMES:
            continue
        cut = box[2].start == 0 or box[2].stop == labels.shape[2]
        measured[index] = (wall_heights(labels[box] == index, spacing), bool(cut))
    own = {i: 1 - min(h[0], h[1]) / h[2] if h[2] > 0 else 1.0 for i, (h, _) in measured.items()}
    out = {}
    for verse, (h, cut) in sorted(measured.items()):
        refs = [k for k, (_, c) in measured.items() if k != verse and not c and own[k] < GENANT_LOSS[0]]
        refs = sorted(refs, key=lambda k: abs(k - verse))[:2]
        neighbour = None
        if refs:
            ref = np.mean([measured[k][0] for k in refs], axis=0)
            neighbour = float(np.min(h / np.maximum(ref, 1e-6)))
        loss = max(own[verse], 1 - neighbour if neighbour is not None else 0.0)
        out[NAMES[verse]] = {
            **{f"{wall}_mm": round(float(v), 2) for wall, v in zip(WALLS, h)},
            "anterior_ratio": round(float(h[0] / h[2]), 3) if h[2] > 0 else None,
            "middle_ratio": round(float(h[1] / h[2]), 3) if h[2] > 0 else None,
            "neighbour_ratio": None if neighbour is None else round(neighbour, 3),
            "height_loss": round(float(np.clip(loss, 0.0, 1.0)), 3),
            "genant_grade": None if cut else genant_grade(loss),
            "cut": cut,
        }
    return out
