"""A montage of mid-sagittal CT views of the generated fractures, for a person to look at.

Numbers say whether the baseline is in range; only a picture says whether the phantoms look like
CT. Each tile is the sagittal plane through one fractured body in a bone window, anterior to the
left and cranial up, as radiologists read a spine.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import numpy as np
from scipy import ndimage

VIEW_MM = 90.0  # side of a tile, mm
VIEW_PX = 0.5  # pixel size of a tile, mm
BONE_WINDOW = (400.0, 1800.0)  # level, width


def sagittal_view(hu: np.ndarray, labels: np.ndarray, grid, label_id: int) -> np.ndarray | None:
    """The mid-sagittal plane through one body, resampled to `VIEW_PX` mm (rows cranial first)."""
    body = labels == label_id
    if not body.any():
        return None
    centre = np.array([np.mean(idx) for idx in np.nonzero(body)])
    n = int(VIEW_MM / VIEW_PX)
    offsets = (np.arange(n) - (n - 1) / 2) * VIEW_PX
    spacing = grid.spacing
    rows = centre[2] - offsets / spacing[2]  # cranial first
    cols = centre[1] + (offsets + 10.0) / spacing[1]  # anterior first, a little shifted to show the canal
    rr, cc = np.meshgrid(rows, cols, indexing="ij")
    coords = np.stack([np.full(rr.shape, round(centre[0])), cc, rr])
    return ndimage.map_coordinates(hu, coords, order=1, cval=-1000.0).astype(np.float16)


def write_montage(path: Path, tiles: list[tuple[np.ndarray, str]], columns: int = 8) -> Path:
    """Writes tiles (image, caption) in a grid, bone window."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = max(1, -(-len(tiles) // columns))
    fig, axes = plt.subplots(rows, columns, figsize=(2.0 * columns, 2.5 * rows), squeeze=False)
    level, width = BONE_WINDOW
    for ax in axes.flat:
        ax.axis("off")
    for ax, (image, caption) in zip(axes.flat, tiles):
        ax.imshow(np.asarray(image, np.float32), cmap="gray", vmin=level - width / 2, vmax=level + width / 2)
        ax.set_title("\n".join(textwrap.wrap(caption, 34)), fontsize=6)
    fig.suptitle(f"Mid-sagittal views of fractured bodies, bone window (L {level:g} / W {width:g} HU), anterior left", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
