"""Training augmentation: torchio transforms named in config, plus the scanner effects torchio lacks.

A CT of the same vertebra from another scanner differs in its reconstruction kernel (soft kernels
blur, sharp bone kernels overshoot at edges), its slice thickness (partial volume along z), the
texture of its noise (the kernel shapes the noise power spectrum: fine grain or blotches) and its
HU calibration. The default pipeline (`conf/data/augment/default.yaml`) draws each of these per
sample so that a classifier cannot tell scanners (or phantom makers) apart by them. The
transforms see windowed [0, 1] intensities; those that speak HU take the window (`hu_window`) and
those that speak mm take the ROI spacing (`spacing`), which the config fills from `data`.
"""

from __future__ import annotations

import torchio as tio
from torchio.transforms import IntensityTransform
from torchio.transforms.augmentation import RandomTransform

from ovcf.data.batch_augment import correlated_noise, hu_per_unit, kernel_mtf, slice_thickness
from ovcf.errors import ConfigError


class RandomKernel(RandomTransform, IntensityTransform):
    """A reconstruction kernel's modulation transfer function, drawn per sample:
    `image + gain * (image - gaussian(image, sigma))`, i.e. MTF(f) = 1 + gain * (1 - G(f)).

    A negative gain is a soft kernel (-1: a plain Gaussian blur of `sigma`, between: high
    frequencies kept in part), a positive one a sharp bone kernel (high frequencies boosted,
    overshoot at edges, noise up). The in-plane and z sigmas are drawn apart (anisotropic PSF).

    Args:
        gain: range `(a, b)` drawn uniformly; one number `d` means `(-d, d)`. A draw below -1 acts
            as -1, so an `augment_strength` above 1 makes plain blurs more frequent.
        sigma: in-plane Gaussian sigma range in ROI voxels.
        sigma_z: sigma range along z (axis 2); None: the in-plane draw (isotropic).
    """

    def __init__(self, gain=(-1.0, 0.8), sigma=(0.5, 1.5), sigma_z=None, **kwargs):
        super().__init__(**kwargs)
        self.gain_range = self._parse_range(gain, "gain")
        self.sigma_range = self._parse_range(sigma, "sigma", min_constraint=0)
        self.sigma_z_range = None if sigma_z is None else self._parse_range(sigma_z, "sigma_z", min_constraint=0)

    def apply_transform(self, subject: tio.Subject) -> tio.Subject:
        for image in self.get_images(subject):
            gain = max(self.sample_uniform(*self.gain_range), -1.0)  # below -1 is no kernel: a plain blur
            sigma = self.sample_uniform(*self.sigma_range)
            sigma_z = sigma if self.sigma_z_range is None else self.sample_uniform(*self.sigma_z_range)
            if gain == 0 or sigma == sigma_z == 0:
                continue
            data = image.data[None].float()
            image.set_data(kernel_mtf(data, [gain], [sigma], [sigma_z])[0].to(image.data.dtype))
        return subject


class RandomSliceThickness(RandomTransform, IntensityTransform):
    """Thick slices: each slice averages `thickness` mm along z (a box slice profile: partial
    volume, which hides a thin line crossing it), slices lie `thickness` apart at a random phase,
    and the cube is linearly interpolated back to its grid, as a thick series resampled to the
    ROI would be. A thickness at or below the ROI spacing changes nothing.

    Args:
        thickness: range in mm, drawn uniformly; one number `d` means `(0, d)`.
        spacing: the ROI's voxel spacing in mm (`data.roi_spacing`).
    """

    def __init__(self, thickness=(1.0, 5.0), spacing: float = 1.25, **kwargs):
        super().__init__(**kwargs)
        self.thickness_range = self._parse_range(thickness, "thickness", min_constraint=0)
        if float(spacing) <= 0:
            raise ConfigError(f"data.augment.RandomSliceThickness.spacing={spacing}: use the ROI spacing in mm (> 0)")
        self.spacing = float(spacing)

    def apply_transform(self, subject: tio.Subject) -> tio.Subject:
        for image in self.get_images(subject):
            width = self.sample_uniform(*self.thickness_range) / self.spacing  # in ROI voxels
            phase = self.sample_uniform(0.0, 1.0)
            if width <= 1:
                continue
            data = image.data[None].float()
            image.set_data(slice_thickness(data, [width], [phase])[0].to(image.data.dtype))
        return subject


class RandomCorrelatedNoise(RandomTransform, IntensityTransform):
    """CT noise of a random texture: white noise filtered by the band-pass `|f| * exp(-2 pi^2
    grain^2 |f|^2)` (the ramp filter of filtered back-projection times a kernel's apodisation),
    scaled to an SD of `hu`. A small `grain` peaks at high frequencies (fine grain, sharp
    kernels), a large one at low frequencies (blotches, soft kernels or iterative reconstruction).

    Args:
        hu: noise SD range in HU, drawn uniformly; one number `d` means `(0, d)`.
        grain: apodisation sigma range in ROI voxels; the spectrum peaks at 1 / (2 pi grain) cycles/voxel.
        hu_window: the HU window the intensities were mapped from (`data.hu_window`).
    """

    def __init__(self, hu=(0.0, 30.0), grain=(0.3, 2.0), hu_window=(-250.0, 1250.0), **kwargs):
        super().__init__(**kwargs)
        self.hu_range = self._parse_range(hu, "hu", min_constraint=0)
        self.grain_range = self._parse_range(grain, "grain", min_constraint=0)
        self.hu_per_unit = hu_per_unit(hu_window)

    def apply_transform(self, subject: tio.Subject) -> tio.Subject:
        for image in self.get_images(subject):
            sd = self.sample_uniform(*self.hu_range)
            grain = self.sample_uniform(*self.grain_range)
            if sd == 0:
                continue
            data = image.data
            noise = correlated_noise(data.shape, grain)
            image.set_data(data + (noise * (sd / self.hu_per_unit)).to(data.dtype))
        return subject


class RandomHuOffset(RandomTransform, IntensityTransform):
    """A calibration offset: every voxel shifted by the same HU, drawn per sample.

    Args:
        hu: offset range in HU, drawn uniformly; one number `d` means `(-d, d)`.
        hu_window: the HU window the intensities were mapped from (`data.hu_window`).
    """

    def __init__(self, hu=(-20.0, 20.0), hu_window=(-250.0, 1250.0), **kwargs):
        super().__init__(**kwargs)
        self.hu_range = self._parse_range(hu, "hu")
        self.hu_per_unit = hu_per_unit(hu_window)

    def apply_transform(self, subject: tio.Subject) -> tio.Subject:
        for image in self.get_images(subject):
            offset = self.sample_uniform(*self.hu_range)
            image.set_data(image.data + offset / self.hu_per_unit)
        return subject


OURS = {cls.__name__: cls for cls in (RandomKernel, RandomSliceThickness, RandomCorrelatedNoise, RandomHuOffset)}


def build_augment(spec: dict | None):
    """A torchio pipeline from `{TransformName: kwargs}` (torchio's names, or ours in `OURS`), or None when empty."""
    if not spec:
        return None
    transforms = []
    for name, kwargs in spec.items():
        factory = OURS.get(name, getattr(tio, name, None))
        if factory is None or not isinstance(factory, type) or not issubclass(factory, tio.Transform):
            raise ConfigError(
                f"data.augment.{name} is not a torchio transform (e.g. RandomFlip, RandomAffine, RandomNoise) "
                f"nor one of {sorted(OURS)}"
            )
        try:
            transforms.append(factory(**{"copy": False, **(kwargs or {})}))
        except (TypeError, ValueError) as err:  # torchio's own checks of names and ranges
            raise ConfigError(f"data.augment.{name}={kwargs}: {err}") from None
    return tio.Compose(transforms, copy=False)  # each sample is cloned into a fresh Subject instead


# How `augment_strength` reaches each transform's magnitudes: "linear" multiplies the range,
# "around_one" scales the distance from 1 (affine scale factors), "above_one" the part above 1 (anisotropy).
STRENGTH_SCALED = {
    "RandomAffine": {"scales": "around_one", "degrees": "linear", "translation": "linear"},
    "RandomGamma": {"log_gamma": "linear"},
    "RandomBlur": {"std": "linear"},
    "RandomBiasField": {"coefficients": "linear"},
    "RandomNoise": {"mean": "linear", "std": "linear"},
    "RandomAnisotropy": {"downsampling": "above_one"},
    "RandomKernel": {"gain": "linear"},
    "RandomSliceThickness": {"thickness": "linear"},  # at or below the ROI spacing: no change
    "RandomCorrelatedNoise": {"hu": "linear"},
    "RandomHuOffset": {"hu": "linear"},
}


def scale_augment(spec: dict | None, strength: float) -> dict | None:
    """`spec` with its transforms' magnitudes multiplied by `strength`, so one number can be searched.

    0 turns augmentation off (flips included), 1 keeps `spec`; flips and transforms not in
    `STRENGTH_SCALED` are kept as they are. A scalar `RandomAffine.scales` is a deviation from 1, a
    pair is a range of factors (torchio's convention), hence the two rules.
    """
    strength = float(strength)
    if strength < 0:
        raise ConfigError(f"data.augment_strength={strength}: use 0 (off), 1 (as configured) or another factor >= 0")
    if not spec or strength == 0:
        return None
    scaled = {}
    for name, kwargs in spec.items():
        kwargs = dict(kwargs or {})
        for key, rule in STRENGTH_SCALED.get(name, {}).items():
            if key not in kwargs:
                continue
            value = kwargs[key]
            if rule == "around_one" and isinstance(value, (list, tuple)):
                rule = "above_one"  # explicit factors: scale their distance from 1
            shift = 1.0 if rule == "above_one" else 0.0
            if isinstance(value, (list, tuple)):
                kwargs[key] = [shift + (v - shift) * strength for v in value]
            else:
                kwargs[key] = shift + (value - shift) * strength
        scaled[name] = kwargs
    return scaled
