"""Random spine anatomy and fractures for one phantom patient.

Everything here is drawn, nothing is rendered: the result is a list of `Vertebra` records in
patient (DICOM LPS) millimetres that `phantom.render` turns into voxels. Sizes follow published
adult figures (T12..L5 bodies 31-39 ml, L1 about 21/24/27 mm anterior/middle/posterior height)
so that a model trained here meets real proportions.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

# Cranio-caudal order of the levels the phantom can show; S1 is drawn as bone but never labelled.
SPINE = [f"T{i}" for i in range(1, 13)] + [f"L{i}" for i in range(1, 6)] + ["S1"]
FIRST_LEVEL, LAST_LEVEL = "T9", "L5"  # the fully visible levels are drawn from this range
CONTRAST_KEYS = ("hu", "step_mm")  # sign parameters that `difficulty` scales
CRUSH_WALL_SHARE = 0.8  # a crush fracture loses this share of its height loss at the walls too


def bmd_hu(t_score: float) -> float:
    """Mean cancellous HU for a DXA T-score: about 160 HU at T=0, about 50 HU at T=-4."""
    return 160.0 + 27.5 * t_score


@dataclass
class Fracture:
    """One osteoporotic compression fracture and the CT signs drawn for it."""

    label: str  # "acute" or "chronic"
    grade: int  # Genant 1..3
    morphology: str  # wedge | biconcave | crush
    loss: float  # fractional height loss at its worst point
    endplate: str  # superior | inferior | both
    signs: dict[str, dict] = field(default_factory=dict)  # sign name -> drawn parameters


@dataclass
class Vertebra:
    """One vertebra in patient space; local axes u (left), v (posterior), w (cranial)."""

    level: str
    origin: np.ndarray  # LPS mm of the centre of the inferior endplate
    rot: np.ndarray  # 3x3, columns are the local axes u, v, w in LPS
    a: float  # half width, mm
    b: float  # half depth, mm
    h_mid: float  # mid-body height, mm
    wedge: float  # (posterior - anterior) / middle height, physiological
    concavity: float  # endplate concavity, mm
    bmd_hu: float
    disc_above: float = 6.0  # height of the disc over the body, mm
    labelled: bool = True
    fracture: Fracture | None = None

    @property
    def posterior_height(self) -> float:
        return self.h_mid * (1 + 0.5 * self.wedge)


def _rotation(rx: float, ry: float, rz: float) -> np.ndarray:
    cx, sx, cy, sy, cz, sz = np.cos(rx), np.sin(rx), np.cos(ry), np.sin(ry), np.cos(rz), np.sin(rz)
    mx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    my = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    mz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return mz @ mx @ my


def _uniform(rng: np.random.Generator, bounds) -> float:
    lo, hi = bounds
    return float(rng.uniform(lo, hi))


def ablation_cues(signs_cfg: dict) -> list[str]:
    """What `ablate` can switch off: every configured sign (either label), then `collapse`."""
    return sorted({name for signs in signs_cfg.values() for name in signs}) + ["collapse"]


def sign_strength(difficulty: float) -> float:
    """How strongly signs show: x2 at difficulty 0, as configured at 0.5, not at all at 1."""
    return 2.0 * (1.0 - difficulty)


def draw_fracture(
    rng: np.random.Generator,
    label: str,
    signs_cfg: dict,
    grades_cfg: dict,
    difficulty: float = 0.5,
    ablate: tuple[str, ...] = (),
    variants: dict[str, str] | None = None,
) -> Fracture:
    """Draws grade, shape and the CT signs of one fracture from the configured mix.

    `difficulty` scales each sign's probability and its contrast (the parameters in
    `CONTRAST_KEYS`) by `sign_strength`, so one number moves a cohort from obvious to hopeless
    while the mix of signs stays the one configured.

    `ablate` switches single cues off to find out what a model reads: a sign named there is drawn
    as usual (the random stream, hence every other draw, stays the same) and then dropped;
    `collapse` gives both labels the same grade mix, so height loss no longer hints at the label.

    `variants` (sign name -> how the renderer draws it, from the patient's style) is stored with
    each drawn sign as `variant`; it is drawn elsewhere so that it takes nothing from `rng`.
    """
    k = sign_strength(difficulty)
    mix = np.asarray(grades_cfg[label], float) / np.sum(grades_cfg[label])
    if "collapse" in ablate:
        mix = np.mean([np.asarray(g, float) / np.sum(g) for g in grades_cfg.values()], axis=0)
    grade = int(rng.choice([1, 2, 3], p=mix))
    loss = _uniform(rng, {1: (0.20, 0.25), 2: (0.25, 0.40), 3: (0.40, 0.55)}[grade])
    morphology = str(rng.choice(["wedge", "biconcave", "crush"], p=[0.5, 0.3, 0.2]))
    if morphology == "biconcave":
        endplate = "both"
    else:
        endplate = str(rng.choice(["superior", "inferior"], p=[0.8, 0.2]))
    signs: dict[str, dict] = {}
    for name, spec in signs_cfg[label].items():
        if rng.random() < min(1.0, spec["p"] * k):
            drawn = {key: _uniform(rng, v) for key, v in spec.items() if key != "p"}
            signs[name] = {key: v * k if key in CONTRAST_KEYS else v for key, v in drawn.items()}
            if name in (variants or {}):
                signs[name]["variant"] = variants[name]
    signs = {name: spec for name, spec in signs.items() if name not in ablate}
    return Fracture(label, grade, morphology, loss, endplate, signs)


def draw_spine(
    rng: np.random.Generator,
    n_levels: tuple[int, int],
    t_score: float,
) -> tuple[list[Vertebra], list[str]]:
    """Draws a run of consecutive levels plus one partial neighbour above and below.

    Returns all vertebrae (cranial first) and the names of the fully visible levels.
    """
    first, last = SPINE.index(FIRST_LEVEL), SPINE.index(LAST_LEVEL)
    n = int(rng.integers(n_levels[0], n_levels[1] + 1))
    start = int(rng.integers(first, last - n + 2))
    visible = SPINE[start : start + n]
    shown = SPINE[max(start - 1, 0) : start + n + 1]

    scale = float(np.clip(rng.normal(1.0, 0.04), 0.9, 1.1))
    base_hu = bmd_hu(t_score)
    curvature = rng.uniform(-1.2e-3, 1.2e-3)  # sagittal (kyphosis / lordosis), 1/mm
    scoliosis = rng.uniform(-4e-4, 4e-4)  # coronal, 1/mm

    # Build from the bottom up so that each body sits on the disc below it.
    vertebrae: list[Vertebra] = []
    z = 0.0
    for name in reversed(shown):
        p = SPINE.index(name) - SPINE.index("T9")  # 0 at T9, 8 at L5
        if name == "S1":
            a, b, h, wedge = 26.0 * scale, 19.0 * scale, 30.0 * scale, 0.15
        else:
            a = (24.55 + 0.36 * p) * scale
            b = (17.75 + 0.26 * p) * scale
            h = (22.5 + 0.6 * p) * scale
            wedge = float(np.interp(p, [0, 4, 6, 8], [0.22, 0.25, 0.0, -0.12]))
        disc = (5.0 + 0.6 * max(p, 0)) * scale
        vert = Vertebra(
            level=name,
            origin=np.zeros(3),
            rot=np.eye(3),
            a=a,
            b=b,
            h_mid=h,
            wedge=wedge + rng.normal(0, 0.03),
            concavity=rng.uniform(0.8, 1.6),
            bmd_hu=base_hu + rng.normal(0, 6.0) + 4.0 * (p - 4) / 4,
            disc_above=disc,
            labelled=name != "S1",
        )
        vert.origin = np.array([0.0, 0.0, z])
        vertebrae.append(vert)
        z += vert.posterior_height + disc
    vertebrae.reverse()

    # Curvature and a small axial rotation per level, about the middle of the run.
    z_mid = np.mean([v.origin[2] for v in vertebrae])
    for vert in vertebrae:
        dz = vert.origin[2] - z_mid
        vert.origin = vert.origin + np.array([scoliosis * dz**2, curvature * dz**2, -z_mid])
        tilt_x = np.arctan(2 * curvature * dz)  # follows the sagittal curve
        tilt_y = -np.arctan(2 * scoliosis * dz)
        vert.rot = _rotation(tilt_x, tilt_y, np.deg2rad(rng.normal(0, 3.0)))
    return vertebrae, visible


def apply_fracture_heights(vertebrae: list[Vertebra]) -> None:
    """Lowers the levels above a crush fracture so that bodies stay stacked on their discs."""
    drop = 0.0
    for vert in reversed(vertebrae):  # caudal first
        vert.origin = vert.origin - np.array([0.0, 0.0, drop])
        f = vert.fracture
        if f is not None and f.morphology == "crush":
            drop += CRUSH_WALL_SHARE * f.loss * vert.h_mid
