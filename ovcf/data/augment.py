"""Training augmentation: torchio transforms named in config, plus what torchio lacks.

CT from another scanner differs from ours in noise, slice thickness, calibration and the
reconstruction kernel: soft kernels blur (torchio's `RandomBlur`), sharp bone kernels enhance
edges and noise, which torchio has no transform for, hence `RandomSharpen`.
"""

from __future__ import annotations

import torch
import torchio as tio
from scipy import ndimage
from torchio.transforms import IntensityTransform
from torchio.transforms.augmentation import RandomTransform

from ovcf.errors import ConfigError


class RandomSharpen(RandomTransform, IntensityTransform):
    """Unsharp masking with a random gain, as a sharp (bone) reconstruction kernel does:
    `image + gain * (image - gaussian(image, sigma))`.

    Args:
        amount: gain range `(a, b)`, drawn uniformly; one number `d` means `(0, d)`.
        sigma: the Gaussian's standard deviation in voxels (the scale of enhanced edges).
    """

    def __init__(self, amount: float | tuple[float, float] = (0.0, 0.6), sigma: float = 1.0, **kwargs):
        super().__init__(**kwargs)
        self.amount_range = self._parse_range(amount, "amount", min_constraint=0)
        self.sigma = float(sigma)

    def apply_transform(self, subject: tio.Subject) -> tio.Subject:
        for image in self.get_images(subject):
            gain = self.sample_uniform(*self.amount_range)
            if gain == 0:
                continue
            data = image.data.numpy()
            smooth = ndimage.gaussian_filter(data, (0, *(self.sigma,) * (data.ndim - 1)))
            image.set_data(torch.from_numpy(data + gain * (data - smooth)).to(image.data.dtype))
        return subject


OURS = {"RandomSharpen": RandomSharpen}


def build_augment(spec: dict | None):
    """A torchio pipeline from `{TransformName: kwargs}` (torchio's names, or `RandomSharpen`), or None when empty."""
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
        transforms.append(factory(**{"copy": False, **(kwargs or {})}))
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
    "RandomSharpen": {"amount": "linear"},
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
