"""Renders drawn anatomy into an ideal (noise-free, infinitely sharp) HU volume and a label map.

Shapes are implicit surfaces evaluated at the scanner's own voxel centres, with a soft edge one
voxel wide so that partial-volume effects appear before the scanner model blurs and adds noise.
Acute and chronic fractures differ only through the radiological signs drawn in `anatomy`:
nothing here adds a constant per label. How everything else looks (body shape, cortex, texture,
surroundings) and which variant of each sign is drawn comes from the patient's `Look` (`style`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from ovcf.contract import LEVEL_IDS
from ovcf.synth.anatomy import CRUSH_WALL_SHARE, SPINE, Vertebra
from ovcf.synth.style import Look

DEFAULT_TISSUES = {
    "air": -1000.0,
    "fat": -100.0,
    "muscle": 50.0,
    "blood": 40.0,
    "disc": 80.0,
    "csf": 15.0,
    "cortical": 700.0,
    "posterior_bone": 380.0,
    "gas": -900.0,
}
TEXTURE_LOW_CUT_MM = 8.0  # 1/f^beta texture: wavelengths longer than about this carry no more power
# Sign variants (ovcf.synth.style.SIGN_VARIANTS); each keeps the sign's configured contrast in about
# as many voxels as the classic variant, so a sign is as learnable in every style.
JAG_MM = 1.2  # amplitude of a jagged crack's zig-zag
CORTICAL_STEP_GAIN = 1.5  # a cortical step fracture steps the endplate this much more ...
CORTICAL_STEP_MM = 3.0  # ... and its lucent line reaches this deep under the surface only
SUBCHONDRAL_MM = 9.0  # subchondral oedema-like attenuation: a band this deep under the collapsed endplate ...
SUBCHONDRAL_GAIN = 1.5  # ... this much denser than the whole-body variant
PATCH_MM = 1.5  # patchy sclerosis: blotches of about this size


@dataclass
class Grid:
    """Voxel centres of an axial scan in patient LPS millimetres (axis-aligned)."""

    x: np.ndarray
    y: np.ndarray
    z: np.ndarray

    @property
    def shape(self) -> tuple[int, int, int]:
        return len(self.x), len(self.y), len(self.z)

    @property
    def spacing(self) -> np.ndarray:
        return np.array([abs(self.x[1] - self.x[0]), abs(self.y[1] - self.y[0]), abs(self.z[1] - self.z[0])])


def _soft(d: np.ndarray, eps: float) -> np.ndarray:
    """0..1 occupancy of a voxel whose centre lies at signed distance d (positive inside)."""
    return np.clip(d / eps + 0.5, 0.0, 1.0)


class _Canvas:
    """The volume being painted plus helpers to visit a vertebra's neighbourhood in its frame."""

    def __init__(self, grid: Grid, tissues: dict, rng: np.random.Generator, look: Look):
        self.grid, self.t, self.rng, self.look = grid, tissues, rng, look
        self.hu = np.full(grid.shape, tissues["air"], np.float32)
        self.labels = np.zeros(grid.shape, np.uint8)
        self.eps = float(np.mean(grid.spacing))
        self.texture = _texture(rng.standard_normal(grid.shape).astype(np.float32), grid.spacing, look)

    def box(self, vert: Vertebra, lo, hi):
        """Index slices and local (u, v, w) coordinates of the voxels near a local-frame box."""
        corners = np.array([[x, y, z] for x in (lo[0], hi[0]) for y in (lo[1], hi[1]) for z in (lo[2], hi[2])])
        world = corners @ vert.rot.T + vert.origin
        sl = []
        for axis, coords in enumerate((self.grid.x, self.grid.y, self.grid.z)):  # increasing
            lo_i, hi_i = np.searchsorted(coords, [world[:, axis].min(), world[:, axis].max()])
            if hi_i <= lo_i:
                return None
            sl.append(slice(int(lo_i), int(hi_i)))
        gx = self.grid.x[sl[0]][:, None, None] - vert.origin[0]
        gy = self.grid.y[sl[1]][None, :, None] - vert.origin[1]
        gz = self.grid.z[sl[2]][None, None, :] - vert.origin[2]
        r = vert.rot  # local = R^T (p - origin)
        u = gx * r[0, 0] + gy * r[1, 0] + gz * r[2, 0]
        v = gx * r[0, 1] + gy * r[1, 1] + gz * r[2, 1]
        w = gx * r[0, 2] + gy * r[1, 2] + gz * r[2, 2]
        return tuple(sl), u, v, w

    def blend(self, sl, occupancy: np.ndarray, value) -> None:
        region = self.hu[sl]
        region += occupancy * (value - region)


def _texture(white: np.ndarray, spacing: np.ndarray, look: Look) -> np.ndarray:
    """Trabecular texture of unit SD from white noise: Gaussian-filtered or 1/f^beta, either anisotropic.

    Classic: Gaussian grain 0.7 mm in-plane, 1.1 mm cranio-caudal (a little longer along the axis).
    """
    sigma_mm = np.array([look.texture_mm, look.texture_mm, look.texture_z_mm])
    if look.texture == "gaussian":
        tex = ndimage.gaussian_filter(white, sigma_mm / spacing)
    elif look.texture == "power":
        freqs = [np.fft.fftfreq(n, d) for n, d in zip(white.shape[:2], spacing[:2])]
        kx, ky, kz = np.meshgrid(*freqs, np.fft.rfftfreq(white.shape[2], spacing[2]), indexing="ij", sparse=True)
        k2 = (kx * sigma_mm[0]) ** 2 + (ky * sigma_mm[1]) ** 2 + (kz * sigma_mm[2]) ** 2  # anisotropic, in grain units
        low = (look.texture_mm / TEXTURE_LOW_CUT_MM) ** 2
        gain = (k2 + low) ** (-look.texture_beta / 4) * np.exp(-2 * np.pi**2 * k2)  # 1/f^beta, cut at the grain
        tex = np.fft.irfftn(np.fft.rfftn(white) * gain.astype(np.float32), s=white.shape).astype(np.float32)
    else:
        raise ValueError(f"unknown texture {look.texture!r}: gaussian or power")
    return tex / (tex.std() + 1e-6)


def _background(c: _Canvas, vertebrae: list[Vertebra]) -> None:
    """Torso, fat, paraspinal and psoas muscles, aorta and IVC, following the spine slice by slice."""
    t, g = c.t, c.grid
    torso, muscle = 1.0 * c.look.torso_scale, 1.0 * c.look.muscle_scale
    zs = np.array([v.origin[2] + 0.5 * v.h_mid for v in vertebrae])[::-1]  # increasing
    order = np.argsort(zs)
    xs = np.array([v.origin[0] for v in vertebrae])[::-1][order]
    ys = np.array([v.origin[1] for v in vertebrae])[::-1][order]
    bs = np.array([v.b for v in vertebrae])[::-1][order]
    pos = np.array([_spine_pos(v.level) for v in vertebrae])[::-1][order]
    zs = zs[order]
    xx, yy = g.x[:, None], g.y[None, :]
    for k, z in enumerate(g.z):
        xc, yc, b, p = (np.interp(z, zs, arr) for arr in (xs, ys, bs, pos))
        sl = (slice(None), slice(None), k)
        inside = np.sqrt(((xx - xc) / (150.0 * torso)) ** 2 + ((yy - (yc - 42.0 * torso)) / (122.0 * torso)) ** 2)
        c.hu[sl] = np.where(inside < 1.0, t["fat"], t["air"])
        c.hu[sl] = np.where((inside > 0.985) & (inside < 1.0), t["muscle"], c.hu[sl])  # skin
        for side in (-1, 1):
            para = ((xx - xc - side * 24.0 * muscle) / (19.0 * muscle)) ** 2
            para = para + ((yy - yc - b - 36.0 * muscle) / (22.0 * muscle)) ** 2
            c.hu[sl] = np.where(para < 1, t["muscle"], c.hu[sl])
            psoas_r = float(np.clip((p - 3.0) * 5.0, 0, 22)) * muscle  # appears below T12, grows caudally
            if psoas_r > 0:
                pso = (xx - xc - side * (b + 16.0 + psoas_r * 0.4)) ** 2 + (yy - yc + 2.0) ** 2
                c.hu[sl] = np.where(pso < psoas_r**2, t["muscle"], c.hu[sl])
        aorta = (xx - xc - 14.0) ** 2 + (yy - yc + b + 15.0) ** 2 < 11.0**2
        ivc = (xx - xc + 20.0) ** 2 + (yy - yc + b + 12.0) ** 2 < 9.0**2
        c.hu[sl] = np.where(aorta | ivc, t["blood"], c.hu[sl])
    c.hu += 6.0 * c.texture * (c.hu > -500)  # mottled soft tissue


def _spine_pos(level: str) -> float:
    return float(SPINE.index(level) - SPINE.index("T9"))


def _canal_v(vert: Vertebra) -> float:
    return vert.b + 8.0


def _disc_and_canal(c: _Canvas, vert: Vertebra) -> None:
    """Disc above this body (filling any collapsed space) and the spinal canal through it."""
    t, disc = c.t, vert.disc_above
    h = vert.posterior_height
    box = c.box(vert, (-vert.a * 1.1, -vert.b * 1.1, 0.3 * h), (vert.a * 1.1, vert.b * 1.1, h + disc + 1.0))
    if box is not None:
        sl, u, v, w = box
        r = np.sqrt((u / (vert.a * 1.03)) ** 2 + (v / (vert.b * 1.03)) ** 2)
        occ = _soft((1 - r) * vert.b, c.eps) * _soft(np.minimum(w - 0.3 * h, h + disc + 1.0 - w), c.eps)
        nucleus = r < 0.55
        c.blend(sl, occ, np.where(nucleus, t["disc"] - 10.0, t["disc"] + 8.0))
    cv = _canal_v(vert)
    box = c.box(vert, (-14, cv - 12, -2.0), (14, cv + 12, h + disc + 2.0))
    if box is not None:
        sl, u, v, w = box
        r = np.sqrt((u / 9.0) ** 2 + ((v - cv) / 7.5) ** 2)
        c.blend(sl, _soft((1 - r) * 7.5, c.eps), t["csf"])


def _posterior_elements(c: _Canvas, vert: Vertebra) -> None:
    """Pedicles and lamina as a ring round the canal, spinous and transverse processes, ribs."""
    t = c.t
    h, cv = vert.posterior_height, _canal_v(vert)
    bone = t["posterior_bone"]
    box = c.box(vert, (-45, cv - 14, 0.0), (45, cv + 48, h))
    if box is None:
        return
    sl, u, v, w = box
    r_in = np.sqrt((u / 9.0) ** 2 + ((v - cv) / 7.5) ** 2)
    r_out = np.sqrt((u / 14.0) ** 2 + ((v - cv) / 12.0) ** 2)
    ring = np.minimum((r_in - 1) * 7.5, (1 - r_out) * 12.0)
    ring = np.minimum(ring, np.minimum(w - 0.12 * h, 0.88 * h - w))
    spin_w = 0.45 * h - 0.35 * (v - cv - 10.0)  # slopes caudally
    spinous = np.minimum.reduce([3.0 - np.abs(u), v - cv - 9.0, cv + 44.0 - v, 0.22 * h - np.abs(w - spin_w)])
    lateral = 22.0 if vert.level.startswith("L") else 14.0
    transverse = np.minimum(4.0 - np.hypot(v - cv + 1.0, w - 0.55 * h), 14.0 + lateral - np.abs(u))
    transverse = np.minimum(transverse, np.abs(u) - 9.0)
    d = np.maximum.reduce([ring, spinous, transverse])
    occ = _soft(d, c.eps)
    c.blend(sl, occ, np.where(d < 1.5, bone + 250.0, bone))
    if vert.level.startswith("T"):
        _ribs(c, vert, short=vert.level == "T12")


def _ribs(c: _Canvas, vert: Vertebra, short: bool) -> None:
    t = c.t
    h, cv = vert.posterior_height, _canal_v(vert)
    radius, tube = 70.0, 5.0
    theta_max = 0.75 if short else 2.3
    drop = 0.25 * radius * theta_max
    for side in (-1, 1):
        start_u = side * 25.0
        box = c.box(
            vert,
            (min(start_u, start_u + side * (radius + tube)), cv - 2 * radius - tube, 0.55 * h - drop - tube),
            (max(start_u, start_u + side * (radius + tube)), cv + tube + 2, 0.55 * h + tube),
        )
        if box is None:
            continue
        sl, u, v, w = box
        cu, cvv = start_u, cv - 2.0 - radius
        du, dv = side * (u - cu), v - cvv
        theta = np.arctan2(du, dv)  # 0 at the start, increasing laterally then anteriorly
        radial = np.hypot(du, dv) - radius
        axial = w - (0.55 * h - 0.25 * radius * np.clip(theta, 0, theta_max))
        d = tube - np.hypot(radial, axial)
        d = np.where((theta >= 0) & (theta <= theta_max), d, -10.0)
        occ = _soft(d, c.eps)
        c.blend(sl, occ, np.where(d < 1.2, t["cortical"] - 150.0, 180.0))


def _fracture_losses(vert: Vertebra, un, vn, r2):
    """Height lost at the superior and inferior endplates (mm) for the fracture's morphology."""
    f = vert.fracture
    zero = np.zeros_like(un)
    if f is None:
        return zero, zero
    depth = f.loss * vert.h_mid
    if f.morphology == "wedge":
        loss = depth * np.clip((1 - vn) / 2, 0, 1) ** 1.3
    elif f.morphology == "biconcave":
        loss = depth * np.clip(1 - r2, 0, 1) ** 0.8
    else:  # crush: the walls lose most of it, the centre all of it
        loss = depth * (CRUSH_WALL_SHARE + (1 - CRUSH_WALL_SHARE) * np.clip(1 - r2, 0, 1))
    if f.endplate == "superior":
        return loss, zero
    if f.endplate == "inferior":
        return zero, loss
    return loss / 2, loss / 2


def _swelling(c: _Canvas, vert: Vertebra) -> None:
    s = vert.fracture.signs.get("soft_tissue_swelling") if vert.fracture else None
    if not s:
        return
    h, grow = vert.h_mid, s["thickness_mm"]
    box = c.box(vert, (-vert.a - grow - 3, -vert.b - grow - 3, -6), (vert.a + grow + 3, vert.b * 0.7, h + 6))
    if box is None:
        return
    sl, u, v, w = box
    if s.get("variant", "ellipsoid") == "crescent":  # thickest in front, thinning out towards the sides
        grow = grow * np.clip((0.3 * vert.b - v) / (1.1 * vert.b), 0.0, 1.0) + 1e-3
    r = np.sqrt((u / (vert.a + grow)) ** 2 + (v / (vert.b + grow)) ** 2)
    d = np.minimum((1 - r) * grow, 6.0 - np.abs(w - h / 2) + h / 2)
    c.blend(sl, _soft(d, 2.0) * (v < vert.b * 0.6), s["hu"])


def _body(c: _Canvas, vert: Vertebra) -> None:
    """Vertebral body: cortical shell, endplates, textured cancellous bone and fracture signs."""
    t, rng, look = c.t, c.rng, c.look
    f = vert.fracture
    signs = f.signs if f else {}
    box = c.box(vert, (-vert.a - 6, -vert.b - 6, -3.0), (vert.a + 6, vert.b + 2, vert.h_mid * 1.2 + 3.0))
    if box is None:
        return
    sl, u, v, w = box
    waist = 1.0 - look.waist * np.sin(np.pi * np.clip(w / vert.h_mid, 0, 1))  # concave lateral and anterior walls
    un = u / (vert.a * waist)
    vn = np.where(v > 0, v * 1.12, v / waist) / vert.b  # flatter posterior wall
    n = look.shape_exponent  # superellipse: 2 an ellipse, larger a box with rounded corners
    r2 = un**2 + vn**2 if n == 2.0 else (np.abs(un) ** n + np.abs(vn) ** n) ** (2.0 / n)
    height = vert.h_mid * (1 + 0.5 * vert.wedge * np.clip(v / vert.b, -1, 1))
    dish = np.clip(1 - r2, 0, 1)
    cup = vert.concavity * look.concavity_scale * (dish if look.cup_power == 1.0 else dish**look.cup_power)
    loss_top, loss_bot = _fracture_losses(vert, un, vn, r2)
    top = height - cup - loss_top
    bot = cup + loss_bot

    planes = []
    if "fracture_lines" in signs:
        s = signs["fracture_lines"]
        for i in range(max(1, int(round(s["count"])))):
            normal = rng.normal(size=3) * np.array([1.0, 1.0, 0.7])
            normal /= np.linalg.norm(normal)
            collapsed_w = np.mean(top) - 4.0 if f.endplate != "inferior" else np.mean(bot) + 4.0
            p0 = np.array([rng.uniform(-0.5, 0.5) * vert.a, rng.uniform(-0.5, 0.3) * vert.b, collapsed_w])
            dist = (u - p0[0]) * normal[0] + (v - p0[1]) * normal[1] + (w - p0[2]) * normal[2]
            near = (u - p0[0]) ** 2 + (v - p0[1]) ** 2 + (w - p0[2]) ** 2 < (0.9 * vert.a) ** 2
            variant = s.get("variant", "plane")
            if variant == "jagged":  # a zig-zag crack: the plane displaced along its normal, phases from p0
                zigzag = np.sin(2 * np.pi * (u + v) / 6.0 + p0[0]) + 0.6 * np.sin(2 * np.pi * (w - u) / 3.5 + p0[1])
                dist = dist + JAG_MM * zigzag
            if i == 0:  # a small step of the endplate across the first line (larger for a cortical step)
                step = s["step_mm"] * (CORTICAL_STEP_GAIN if variant == "step" else 1.0) * ((dist > 0) & near)
                top = top - step if f.endplate != "inferior" else top
                bot = bot + step if f.endplate == "inferior" else bot
            planes.append((np.abs(dist), near, s["width_mm"], variant))

    d_lat = (1 - np.sqrt(r2)) * min(vert.a, vert.b)
    d_top, d_bot = top - w, w - bot
    sd = np.minimum.reduce([d_lat, d_top, d_bot])
    d_col = {"superior": d_top, "inferior": d_bot}.get(f.endplate, np.minimum(d_top, d_bot)) if f else d_top

    canc = vert.bmd_hu + look.texture_hu * c.texture[sl]
    if "raised_attenuation" in signs:
        s = signs["raised_attenuation"]
        if s.get("variant", "whole") == "whole":
            canc = canc + s["hu"]
        else:  # subchondral: a band under the collapsed endplate, denser, fading into the body
            canc = canc + SUBCHONDRAL_GAIN * s["hu"] * _soft(SUBCHONDRAL_MM - d_col, 4.0)
    if "impaction_band" in signs:
        s = signs["impaction_band"]
        centre, sigma, hu = s["depth_mm"] + s["width_mm"] / 2, s["width_mm"] / 2.5, s["hu"]
        if s.get("variant", "sharp") == "diffuse":  # wider and fainter, about as many condensed voxels
            centre, sigma, hu = centre + 1.0, s["width_mm"] / 1.4, 0.7 * hu
        canc = canc + hu * np.exp(-0.5 * ((d_col - centre) / sigma) ** 2)
    if "sclerotic_margin" in signs:
        s = signs["sclerotic_margin"]
        if s.get("variant", "rim") == "rim":
            canc = canc + s["hu"] * _soft(s["thickness_mm"] - d_col, 0.6)
        else:  # patchy: blotches of sclerosis in a deeper zone under the endplate
            patches = ndimage.gaussian_filter(c.texture[sl], PATCH_MM / c.grid.spacing)
            patches = _soft(patches / (patches.std() + 1e-6) + 0.3, 1.5)
            canc = canc + 1.2 * s["hu"] * patches * _soft(1.6 * s["thickness_mm"] - d_col, 1.0)
    cortex = np.maximum.reduce(
        [_soft(look.cortex_mm - d_lat, c.eps), _soft(look.endplate_mm - d_top, c.eps), _soft(look.endplate_mm - d_bot, c.eps)]
    )
    value = canc + cortex * (t["cortical"] - canc)
    for dist, near, width, variant in planes:  # lucent lines through trabeculae and breaks in the cortex
        line = _soft(width / 2 - dist, 0.5) * near
        if variant == "step":  # only the cortex breaks: the line fades within a few mm of the surface
            line = line * _soft(CORTICAL_STEP_MM - sd, 1.0)
        value = value + line * (t["blood"] - value)
    if "vacuum_cleft" in signs:
        s = signs["vacuum_cleft"]
        wc = np.mean(top) - 4.0 if f.endplate != "inferior" else np.mean(bot) + 4.0
        if s.get("variant", "slit") == "slit":
            e = (u / (s["length_mm"] / 2)) ** 2 + ((v + 0.2 * vert.b) / (s["length_mm"] / 3)) ** 2
            e = e + ((w - wc) / (s["height_mm"] / 2)) ** 2
            gas = _soft((1 - np.sqrt(e)) * s["height_mm"] / 2, 0.5)
        else:  # bubble: three round gas pockets along the cleft's line
            radius = 0.8 * s["height_mm"]
            gas = np.zeros_like(u)
            for k in (-1, 0, 1):
                e = ((u - k * s["length_mm"] / 3) ** 2 + (v + 0.2 * vert.b + 1.5 * k) ** 2 + (w - wc) ** 2) / radius**2
                gas = np.maximum(gas, _soft((1 - np.sqrt(e)) * radius, 0.5))
        value = value + gas * (t["gas"] - value)

    c.blend(sl, _soft(sd, c.eps), value)
    if vert.labelled:
        c.labels[sl][sd > 0] = LEVEL_IDS[vert.level]

    if "osteophytes" in signs:  # beaks from the anterior endplate rims towards the discs, outside the mask
        size = signs["osteophytes"]["size_mm"]
        rim = vn < -0.8
        for wo, towards in ((bot[rim].mean(), -1), (top[rim].mean(), 1)) if rim.any() else ((0.0, -1), (vert.h_mid, 1)):
            dv = (v + vert.b + 0.35 * size) / (0.55 * size)
            dw = (w - wo - towards * 0.45 * size) / (0.9 * size)
            e = (u / (2.2 * size)) ** 2 + dv**2 + dw**2
            spur = _soft((1 - np.sqrt(e)) * size * 0.55, c.eps) * (sd <= 0)
            c.blend(sl, spur, t["cortical"] - 250.0)


def render(
    vertebrae: list[Vertebra], grid: Grid, rng: np.random.Generator, tissues: dict | None = None, look: Look | None = None
):
    """Ideal HU volume and VerSe label map on `grid` (both indexed x, y, z), in `look` (default classic)."""
    look = look or Look()
    c = _Canvas(grid, {**DEFAULT_TISSUES, **look.tissues(), **(tissues or {})}, rng, look)
    _background(c, vertebrae)
    for vert in vertebrae:
        _swelling(c, vert)
    for vert in vertebrae:
        _disc_and_canal(c, vert)
    for vert in vertebrae:
        _posterior_elements(c, vert)
    for vert in vertebrae:
        _body(c, vert)
    return c.hu, c.labels
