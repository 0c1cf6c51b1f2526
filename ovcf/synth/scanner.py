"""Scanner model: where voxels are sampled and how the ideal volume is degraded into a CT.

Two hospitals differ mostly in reconstruction (pixel spacing, slice thickness and spacing, soft vs
sharp kernel), noise and small calibration offsets; those are what a model must generalise over.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from ovcf.synth.anatomy import Vertebra
from ovcf.synth.phantom import Grid

BLOTCH_MM = 2.5  # correlation length of blotchy (low-frequency) noise


@dataclass
class Scanner:
    """One center's acquisition and reconstruction protocol."""

    manufacturer: str = "SIEMENS"
    model: str = "SOMATOM Definition AS"
    kernel: str = "B30f"
    pixel_spacing: float = 0.8  # mm, in-plane
    matrix: int = 160
    slice_thickness: float = 1.0  # mm, nominal reconstructed thickness (FWHM)
    slice_spacing: float = 1.0  # mm between slice centres; < thickness means overlapping slices
    blur_mm: float = 0.6  # in-plane PSF sigma of the kernel
    sharpen: float = 0.0  # edge enhancement of sharp kernels (unsharp-mask gain)
    noise_hu: float = 12.0  # noise SD in water
    hu_offset: float = 0.0  # calibration offset
    feet_first: bool = False
    noise_grain_mm: float | None = None  # noise correlation length in-plane (None: 0.6 voxels)
    blotch: float = 0.0  # share of low-frequency (blotchy) noise power; the rest is the fine grain


def make_grid(vertebrae: list[Vertebra], scanner: Scanner, rng: np.random.Generator) -> Grid:
    """Axial grid centred on the spine, from mid-body of the lowest to mid-body of the top level."""
    z_lo = vertebrae[-1].origin[2] + 0.5 * vertebrae[-1].h_mid
    z_hi = vertebrae[0].origin[2] + 0.5 * vertebrae[0].h_mid
    n_z = int(np.floor((z_hi - z_lo) / scanner.slice_spacing)) + 1
    z = z_lo + scanner.slice_spacing * np.arange(n_z)
    centre = np.array([rng.normal(0, 3.0), 18.0 + rng.normal(0, 3.0)])
    offsets = (np.arange(scanner.matrix) - (scanner.matrix - 1) / 2) * scanner.pixel_spacing
    return Grid(x=centre[0] + offsets, y=centre[1] + offsets, z=z + rng.uniform(-0.5, 0.5))


def acquire(ideal: np.ndarray, grid: Grid, scanner: Scanner, rng: np.random.Generator) -> np.ndarray:
    """Blurs by the kernel and slice profile, adds correlated noise and the calibration offset.

    The kernel's MTF is a Gaussian, with overshoot for sharp kernels (`sharpen`); the noise power
    spectrum is a fine grain (`noise_grain_mm`) plus, for `blotch` > 0, a share of low-frequency
    blotches. Both come from the same white noise, so a style does not change the random stream.
    """
    spacing = grid.spacing
    sigma_z = np.hypot(scanner.slice_thickness / 2.355, scanner.blur_mm)
    sigma = np.array([scanner.blur_mm, scanner.blur_mm, sigma_z]) / spacing
    image = ndimage.gaussian_filter(ideal, sigma)
    if scanner.sharpen > 0:
        image = image + scanner.sharpen * (image - ndimage.gaussian_filter(image, 2 * sigma))
    white = rng.standard_normal(ideal.shape).astype(np.float32)
    grain = [0.6, 0.6] if scanner.noise_grain_mm is None else [scanner.noise_grain_mm / s for s in spacing[:2]]
    noise = ndimage.gaussian_filter(white, [*grain, 0.3])
    noise = noise * (scanner.noise_hu / (noise.std() + 1e-6))
    if scanner.blotch > 0:
        blotches = ndimage.gaussian_filter(white, BLOTCH_MM / spacing)
        blotches = blotches * (scanner.noise_hu / (blotches.std() + 1e-6))
        noise = np.sqrt(1 - scanner.blotch) * noise + np.sqrt(scanner.blotch) * blotches
    image = image + noise + scanner.hu_offset
    return image.astype(np.float32)
