"""Rendering styles: how a phantom looks, apart from the fracture signs that a model should learn.

A model trained on one phantom maker's look learns the look. A style (one YAML file under
`conf/synthetic/style/`) draws, per patient and from wide ranges, everything that is not a
fracture sign: the body's shape, cortex and endplates, the trabecular texture, the surrounding
anatomy and field of view, and the reconstruction (kernel, noise texture, slice thickness,
calibration). It also gives each sign a distribution over the ways it can be drawn (a fracture
line as a plane, a jagged crack or a cortical step...). The sign names, their probabilities per
label and their contrasts stay in `signs:` and mean the same in every style.

A style's file maps `Look` field names to a value, a `[low, high]` range (drawn uniformly) or a
list of choices (drawn uniformly); a field it leaves out keeps the `Look` default, which is the
`classic` look (the generator's look before styles existed). `null` for a reconstruction field
keeps the center's own protocol value.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import TYPE_CHECKING

import numpy as np

from ovcf.errors import ConfigError

if TYPE_CHECKING:  # the scanner module imports the phantom, which imports this one
    from ovcf.synth.scanner import Scanner

# The ways each sign can be drawn; the first is the classic one (what the renderer does by default).
SIGN_VARIANTS = {
    "fracture_lines": ("plane", "jagged", "step"),
    "impaction_band": ("sharp", "diffuse"),
    "raised_attenuation": ("whole", "subchondral"),
    "soft_tissue_swelling": ("ellipsoid", "crescent"),
    "sclerotic_margin": ("rim", "patchy"),
    "vacuum_cleft": ("slit", "bubble"),
}
MIN_SLICE_SPACING_MM = 0.8  # thinner slices are reconstructed at least this far apart (keeps generation fast)
MAX_SLICE_SPACING_MM = 3.0  # so the 5 mm soft-tissue recon of the export always holds fewer slices than the thin one


@dataclass
class Look:
    """One patient's drawn style; the defaults are the classic look."""

    name: str = "classic"
    # vertebral body
    shape_exponent: float = 2.0  # superellipse exponent of the axial section: 2 ellipse, 4-8 box
    waist: float = 0.05  # the walls are this much narrower at mid-height (concave walls)
    concavity_scale: float = 1.0  # times the anatomy's drawn endplate concavity (0.8-1.6 mm)
    cup_power: float = 1.0  # endplate profile: < 1 broad dish, > 1 central pit
    cortex_mm: float = 1.2  # cortical shell of the walls
    endplate_mm: float = 1.0  # cortical endplates
    cortical_hu: float = 700.0
    # cancellous bone
    texture: str = "gaussian"  # gaussian (blurred white noise) | power (1/f^beta noise)
    texture_mm: float = 0.7  # in-plane grain (Gaussian sigma; the high-frequency cut-off of `power`)
    texture_z_mm: float = 1.1  # cranio-caudal grain: >> texture_mm rods, << texture_mm plates
    texture_beta: float = 2.0  # spectral slope of `power`
    texture_hu: float = 35.0  # texture amplitude (SD) in HU
    # surroundings and field of view
    torso_scale: float = 1.0
    muscle_scale: float = 1.0
    fat_hu: float = -100.0
    fov_scale: float = 1.0  # times the center's matrix (the pixel spacing is the center's)
    # reconstruction; None keeps the center's value
    blur_mm: float | None = None  # Gaussian MTF sigma in-plane
    sharpen: float | None = None  # edge enhancement (overshoot) of a sharp kernel
    slice_thickness: float | None = None
    slice_overlap: float | None = None  # slice spacing / thickness
    noise_grain_mm: float | None = None  # noise correlation length in-plane (NPS width)
    blotch: float = 0.0  # share of low-frequency (blotchy) noise power
    noise_factor: float = 1.0  # times the center's noise SD
    hu_offset: float = 0.0  # added to the center's calibration offset
    signs: dict = field(default_factory=dict)  # sign name -> {variant: weight}

    def scanner_for(self, center: Scanner) -> Scanner:
        """The center's protocol (its identity and pixel spacing) reconstructed the way this look says."""
        scanner = replace(
            center,
            matrix=int(round(center.matrix * self.fov_scale)),
            noise_hu=center.noise_hu * self.noise_factor,
            hu_offset=center.hu_offset + self.hu_offset,
            noise_grain_mm=self.noise_grain_mm,
            blotch=self.blotch,
        )
        for key in ("blur_mm", "sharpen", "slice_thickness"):
            if getattr(self, key) is not None:
                scanner = replace(scanner, **{key: getattr(self, key)})
        if self.slice_thickness is not None or self.slice_overlap is not None:
            spacing = scanner.slice_thickness * (self.slice_overlap if self.slice_overlap is not None else 1.0)
            scanner = replace(scanner, slice_spacing=float(np.clip(spacing, MIN_SLICE_SPACING_MM, MAX_SLICE_SPACING_MM)))
        return scanner

    def tissues(self) -> dict:
        """Tissue HU this look sets (configured `tissues` still override them)."""
        return {"fat": self.fat_hu, "cortical": self.cortical_hu}


LOOK_FIELDS = [f.name for f in fields(Look) if f.name not in ("name", "signs")]


def _draw(rng: np.random.Generator, spec):
    """A value, a [low, high] range of numbers (uniform) or a list of choices (uniform)."""
    if isinstance(spec, (list, tuple)):
        if len(spec) == 2 and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in spec):
            return spec[0] if spec[0] == spec[1] else float(rng.uniform(spec[0], spec[1]))
        return spec[0] if len(spec) == 1 else spec[int(rng.integers(len(spec)))]
    return spec


def check_styles(cfg: dict) -> tuple[dict, list[str]]:
    """The configured styles and the names patients are drawn from, or a ConfigError naming the field.

    A configuration without `styles` renders every patient in the classic look.
    """
    styles = cfg.get("styles") or {"classic": {}}
    mix = cfg.get("style_mix") or list(styles)
    if isinstance(mix, str):
        mix = [mix]
    unknown = [name for name in mix if name not in styles]
    if unknown:
        raise ConfigError(
            f"synthetic.style_mix names {', '.join(map(str, unknown))}: the known styles are {', '.join(styles)} "
            "(conf/synthetic/style/, listed under synthetic.styles)"
        )
    for name, spec in styles.items():
        bad = set(spec or {}) - set(LOOK_FIELDS) - {"signs"}
        if bad:
            raise ConfigError(
                f"synthetic.styles.{name} has unknown key(s) {', '.join(sorted(bad))}; "
                f"a style sets {', '.join(LOOK_FIELDS)}, signs"
            )
        for sign, variants in ((spec or {}).get("signs") or {}).items():
            known = SIGN_VARIANTS.get(sign)
            names = [variants] if isinstance(variants, str) else list(variants)
            if known is None or set(names) - set(known):
                raise ConfigError(
                    f"synthetic.styles.{name}.signs.{sign}: choose variants of "
                    + "; ".join(f"{s}: {', '.join(v)}" for s, v in SIGN_VARIANTS.items())
                )
    return styles, list(mix)


def draw_look(rng: np.random.Generator, styles: dict, mix: list[str]) -> Look:
    """Picks one style of `mix` and draws its parameters (the patient's own style stream)."""
    name = mix[int(rng.integers(len(mix)))] if len(mix) > 1 else mix[0]
    spec = styles[name] or {}
    drawn = {key: _draw(rng, spec[key]) for key in LOOK_FIELDS if key in spec}
    signs = {}
    for sign, variants in (spec.get("signs") or {}).items():
        weights = {variants: 1.0} if isinstance(variants, str) else variants
        weights = weights if isinstance(weights, dict) else {v: 1.0 for v in weights}
        signs[sign] = {str(k): float(v) for k, v in weights.items()}
    return Look(name=name, signs=signs, **drawn)


def draw_variants(rng: np.random.Generator, look: Look) -> dict[str, str]:
    """How each sign would be drawn on one fracture, drawn for every sign whether it shows or not.

    Drawing them all, from the style's own stream, keeps every other draw the same when a sign is
    ablated or its probability changes.
    """
    variants = {}
    for sign, known in SIGN_VARIANTS.items():
        weights = look.signs.get(sign) or {known[0]: 1.0}
        names = list(weights)
        p = np.asarray([weights[n] for n in names], float)
        variants[sign] = names[0] if len(names) == 1 else str(rng.choice(names, p=p / p.sum()))
    return variants
