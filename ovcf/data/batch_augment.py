"""Training augmentation as batched tensor operations on the device the model trains on.

torchio transforms one sample at a time in the loader (24 ms per 48^3 ROI of the default pipeline
on this project's 2-core CPU), so on a GPU the step waits for data and on a CPU a third of the run
is augmentation. `BatchAugment` draws the same transforms, under the same config names and ranges
(`conf/data/augment/default.yaml`), for a whole batch after it reached the device: one
`grid_sample` for flip, scale, rotation and shift, a matrix product along an axis per sample for
the kernel's PSF and the slice profile, an FFT per sample for the noise texture. Each sample's draw depends on (seed,
epoch, index) alone and every operation is elementwise or per sample, so a sample comes out
bit-identical in any batch: resume and DDP stay exact. The torchio engine
(`data/augment=torchio`) stays for users' own transforms.

Work is done only where it shows: a flip and an affine resample once, their maps composed, and a
2.5D network, which reads 5 sagittal planes in rows 20-28 of 48, gets only those rows augmented
(`reads`): the resampling makes them and the kernel's reach around them, and each transform after
keeps what the rest still needs. That costs a third of the whole cube's pipeline.

Tensors are (B, C, X, Y, Z): X, Y, Z the ROI cube's axes in RAS, Z the scan's slice direction.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import torch
import torch.nn.functional as F

from ovcf.data.sampling import sample_seed
from ovcf.errors import ConfigError

Z = 4  # the slice axis of a (B, C, X, Y, Z) batch


def hu_per_unit(hu_window) -> float:
    """HU per unit of the windowed [0, 1] intensity: the window's width."""
    lo, hi = (float(v) for v in hu_window)
    if hi <= lo:
        raise ConfigError(f"data.hu_window={list(hu_window)}: the upper HU must exceed the lower")
    return hi - lo


# --- operations on a batch, one parameter per sample (the torchio transforms call these with B = 1)


def _per_sample(values, x: torch.Tensor) -> torch.Tensor:
    """A (B,) parameter as a (B, 1, 1, 1, 1) tensor on `x`'s device, to broadcast over a sample."""
    return torch.as_tensor(values, dtype=x.dtype, device=x.device).reshape(-1, 1, 1, 1, 1)


def mix_along(x: torch.Tensor, matrices: torch.Tensor, axis: int) -> torch.Tensor:
    """Each sample of `x` (B, C, X, Y, Z) mixed along `axis` (2, 3 or 4) by its own (n, n) matrix, a
    slice of `matrices` (B, n, n): `out[i] = sum_k M[i, k] x[k]` along that axis. Any linear 1D
    operator (a convolution with its edges, a resampling) is one such matrix. One matrix product
    per sample, each of the same shape whatever the batch, so a sample's result does not depend on
    the batch it is in; on a CPU 2-5x faster than a 7-tap loop of shifted multiply-adds."""
    m = matrices.to(x)
    out = torch.empty_like(x)
    n = x.shape[axis]
    for b in range(len(x)):
        pre = x[b].reshape(-1, n, math.prod(x.shape[axis + 1 :]))  # (before, n, after)
        if axis == Z:
            out[b] = (pre.reshape(-1, n) @ m[b].T).reshape(x.shape[1:])
        elif pre.shape[0] == 1:  # the first spatial axis of one channel: a transposed product (BLAS is faster so)
            out[b] = (pre[0].T @ m[b].T).T.reshape(x.shape[1:])
        else:
            out[b] = torch.matmul(m[b], pre).reshape(x.shape[1:])
    return out


def band_matrix(weights: torch.Tensor, n: int) -> torch.Tensor:
    """(B, n, n) matrices of the 1D convolutions with the odd-length kernels `weights` (B, K) over n
    voxels, the edges repeating their last voxel (scipy's "nearest")."""
    b, k = weights.shape
    cols = (torch.arange(n, device=weights.device)[:, None] + torch.arange(k, device=weights.device) - k // 2).clamp(0, n - 1)
    m = torch.zeros(b, n, n, dtype=weights.dtype, device=weights.device)
    return m.scatter_add_(2, cols.expand(b, n, k), weights[:, None, :].expand(b, n, k))


def conv_along(x: torch.Tensor, weights: torch.Tensor, axis: int) -> torch.Tensor:
    """Each sample of `x` (B, C, X, Y, Z) convolved along `axis` (2, 3 or 4) with its own odd-length
    1D kernel, a row of `weights` (B, K); the edges repeat their last voxel (scipy's "nearest")."""
    return mix_along(x, band_matrix(weights.double(), x.shape[axis]), axis)


def gaussian_weights(sigma: torch.Tensor, radius: int) -> torch.Tensor:
    """(B, 2 radius + 1) normalised Gaussian taps; a sigma of 0 is the identity."""
    taps = torch.arange(-radius, radius + 1, dtype=sigma.dtype, device=sigma.device)
    w = torch.exp(-0.5 * (taps / sigma.clamp_min(1e-6)[:, None]) ** 2)
    return w / w.sum(1, keepdim=True)


def kernel_mtf(x: torch.Tensor, gain, sigma, sigma_z, largest: float | None = None, keep=None) -> torch.Tensor:
    """`x + gain * (x - gaussian(x))` per sample: a reconstruction kernel's MTF, 1 + gain (1 - G(f)).
    gain -1 is a plain blur, above 0 a sharp bone kernel (edge overshoot); below -1 acts as -1.
    The Gaussians reach 3 `largest` sigmas (default: this batch's largest; a transform passes its
    range's, so that a sample's result does not depend on its batch). `keep`: the X rows to return,
    the blur along X still reading all (the other axes then blur only those)."""
    gain = torch.as_tensor(gain, dtype=x.dtype).clamp_min(-1.0)
    sigma, sigma_z = (torch.as_tensor(s, dtype=x.dtype) for s in (sigma, sigma_z))
    smooth = x
    for axis, s in ((2, sigma), (3, sigma), (Z, sigma_z)):
        if float(s.max()) > 0:
            reach = float(s.max()) if largest is None else largest
            smooth = conv_along(smooth, gaussian_weights(s, max(1, math.ceil(3 * reach))), axis)
        if axis == 2 and keep is not None:
            x, smooth = x[:, :, keep], smooth[:, :, keep]
    return x + _per_sample(gain, x) * (x - smooth)


def slice_thickness(x: torch.Tensor, width, phase) -> torch.Tensor:
    """Thick slices: each slice averages `width` voxels along z (a box profile: partial volume), the
    slices lie `width` apart from a `phase` in [0, 1), and the cube is interpolated back to its grid,
    as a thick series resampled to the ROI would be. A width at or below one voxel changes nothing."""
    width = torch.as_tensor(width, dtype=torch.float64).reshape(-1)
    phase = torch.as_tensor(phase, dtype=torch.float64).reshape(-1)
    if float(width.max()) <= 1:
        return x
    return mix_along(x, thick_slice_matrix(x.shape[Z], width, phase), Z)


def thick_slice_matrix(n: int, width: torch.Tensor, phase: torch.Tensor) -> torch.Tensor:
    """(B, n, n) float64: the box average of `width` voxels, then the thick slices' linear
    interpolation back onto the n voxels (clamped at the ends), as one matrix along z per sample."""
    w = width.clamp_min(1.0)
    reach = math.ceil(float(w.max()) / 2)
    taps = torch.arange(-reach, reach + 1, dtype=torch.float64)
    half = (w / 2)[:, None]
    box = (torch.minimum(taps + 0.5, half) - torch.maximum(taps - 0.5, -half)).clamp_min(0)  # voxel overlap
    average = band_matrix(box / box.sum(1, keepdim=True), n)
    count = torch.ceil(n / w) + 2  # slices, one beyond each end
    grid = torch.arange(n, dtype=torch.float64)
    p = torch.minimum(((grid + 0.5) / w[:, None] - phase[:, None] + 1).clamp_min(0), (count - 1)[:, None])
    j0 = p.floor()
    j1 = torch.minimum(j0 + 1, (count - 1)[:, None])
    interp = torch.zeros(len(w), n, n, dtype=torch.float64)
    for j, share in ((j0, 1 - (p - j0)), (j1, p - j0)):
        centre = ((phase[:, None] + j - 1) * w[:, None] - 0.5).clamp(0, n - 1)  # slice j's centre in voxels
        lo = centre.floor()
        hi = (lo + 1).clamp(max=n - 1)
        interp.scatter_add_(2, lo.long()[..., None], (share * (1 - (centre - lo)))[..., None])
        interp.scatter_add_(2, hi.long()[..., None], (share * (centre - lo))[..., None])
    matrices = interp @ average
    matrices[width <= 1] = torch.eye(n, dtype=torch.float64)
    return matrices


@functools.lru_cache(maxsize=8)
def _squared_frequencies(nx: int, ny: int, nz: int, device: torch.device) -> torch.Tensor:
    """|f|^2 on the half-spectrum grid of an (nx, ny, nz) real FFT: the same for every sample of a batch."""
    fx, fy = torch.fft.fftfreq(nx, device=device), torch.fft.fftfreq(ny, device=device)
    fz = torch.fft.rfftfreq(nz, device=device)
    return fx[:, None, None] ** 2 + fy[None, :, None] ** 2 + fz[None, None, :] ** 2


def correlated_noise(shape, grain: float, generator: torch.Generator | None = None, device=None) -> torch.Tensor:
    """Noise of `shape` (..., X, Y, Z), float32, at unit SD per leading index, whose spectrum over the
    last three axes is the band-pass `|f| exp(-2 pi^2 grain^2 |f|^2)` (the ramp filter of filtered
    back-projection times a kernel's apodisation). White noise's Fourier coefficients are themselves
    white, so they are drawn on the half-spectrum directly: one inverse FFT, where filtering white
    noise takes two."""
    *lead, nx, ny, nz = shape
    f2 = _squared_frequencies(nx, ny, nz, torch.device(device or "cpu"))
    spectrum = f2.sqrt() * torch.exp(-2 * np.pi**2 * float(grain) ** 2 * f2)
    white = torch.randn((*lead, *spectrum.shape), dtype=torch.complex64, generator=generator, device=device)
    noise = torch.fft.irfftn(white * spectrum, s=(nx, ny, nz), dim=(-3, -2, -1))
    return noise / noise.std(dim=(-3, -2, -1), keepdim=True).clamp_min(1e-12)


def bias_field(shape, coefficients: torch.Tensor, order: int, rows=None) -> torch.Tensor:
    """exp of a polynomial of `order` over the cube ([-1, 1] per axis, voxel centres), one per row of
    `coefficients` (B, terms), as torchio's RandomBiasField draws it: a slow multiplicative drift.
    `rows` (lo, hi) keeps only those X rows of the cube's field."""
    rows = None if rows is None else (int(rows[0]), int(rows[1]))
    terms = _monomials(tuple(int(n) for n in shape), order, rows, coefficients.device, coefficients.dtype)
    return torch.exp(torch.einsum("bt,txyz->bxyz", coefficients, terms))[:, None]


@functools.lru_cache(maxsize=8)
def _monomials(shape, order: int, rows, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """The bias field's monomials over the cube, (terms, X, Y, Z): the same for every batch of a shape."""
    axes = []
    for n in shape:
        r = torch.arange(n, dtype=dtype, device=device) - n / 2 + 0.5
        axes.append(r / r.max())
    if rows is not None:
        axes[0] = axes[0][rows[0] : rows[1]]
    x, y, z = torch.meshgrid(*axes, indexing="ij")
    terms = [x**i * y**j * z**k for i in range(order + 1) for j in range(order + 1 - i) for k in range(order + 1 - i - j)]
    return torch.stack(terms)


def bias_terms(order: int) -> int:
    """The number of monomials of a polynomial of `order` in three variables."""
    return (order + 1) * (order + 2) * (order + 3) // 6


def affine_grid(matrices: torch.Tensor, shape, rows: tuple[int, int] | None = None) -> torch.Tensor:
    """The sampling grid of `grid_sample` for (B, 3, 4) voxel-space maps (output voxel -> input
    voxel, in X, Y, Z order, about the cube's centre). grid_sample reads its coordinates as (Z, Y,
    X) for a (B, C, X, Y, Z) tensor, with -1 and 1 at the corner voxels' centres. `rows` (lo, hi):
    the grid of those output X rows only (the same values as the whole grid's rows)."""
    n = torch.tensor(shape, dtype=matrices.dtype, device=matrices.device)
    half = (n - 1) / 2
    linear = matrices[:, :, :3] * half[None, :, None] / half[None, None, :]  # in normalised coordinates
    shift = matrices[:, :, 3] / half
    theta = torch.cat([linear, shift[:, :, None]], dim=2)
    flip = [2, 1, 0]
    theta = torch.cat([theta[:, flip][:, :, flip], theta[:, flip, 3:]], dim=2)
    # F.affine_grid's kernel is slow on a CPU and a batched matmul rounds by batch size; sums of
    # per-axis terms (small until the last one) give each sample the same grid in any batch:
    nx, ny, nz = (int(k) for k in shape)
    x, y, z = (torch.linspace(-1, 1, k, dtype=theta.dtype, device=theta.device) for k in (nx, ny, nz))
    if rows is not None:
        x = x[rows[0] : rows[1]]
        nx = len(x)
    grid = theta[:, None, None, None, :, 3] + x.reshape(1, nx, 1, 1, 1) * theta[:, None, None, None, :, 2]
    grid = grid + y.reshape(1, 1, ny, 1, 1) * theta[:, None, None, None, :, 1]
    return grid + z.reshape(1, 1, 1, nz, 1) * theta[:, None, None, None, :, 0]


def rotation(degrees: torch.Tensor) -> torch.Tensor:
    """(B, 3, 3) rotations from (B, 3) Euler angles in degrees about X, Y and Z."""
    a = torch.deg2rad(degrees)
    c, s = a.cos(), a.sin()
    one, zero = torch.ones_like(c[:, 0]), torch.zeros_like(c[:, 0])

    def mat(rows):
        return torch.stack([torch.stack(r, -1) for r in rows], -2)

    rx = mat([[one, zero, zero], [zero, c[:, 0], -s[:, 0]], [zero, s[:, 0], c[:, 0]]])
    ry = mat([[c[:, 1], zero, s[:, 1]], [zero, one, zero], [-s[:, 1], zero, c[:, 1]]])
    rz = mat([[c[:, 2], -s[:, 2], zero], [s[:, 2], c[:, 2], zero], [zero, zero, one]])
    return rz @ ry @ rx


# --- config: each transform's ranges, parsed as torchio parses them


def _range(name: str, key: str, value, symmetric: bool = True, around: float = 0.0, low: float | None = None):
    """`(a, b)` from a number `d` (`(around - d, around + d)`, or `(0, d)` when not symmetric) or a pair."""
    if isinstance(value, (int, float)):
        pair = (around - value, around + value) if symmetric else (0.0, float(value))
    elif isinstance(value, (list, tuple)) and len(value) == 2:
        pair = (float(value[0]), float(value[1]))
    else:
        raise ConfigError(f"data.augment.{name}.{key}={value}: use a number or a [low, high] pair")
    if pair[0] > pair[1] or (low is not None and pair[0] < low):
        bound = "" if low is None else f", both >= {low}"
        raise ConfigError(f"data.augment.{name}.{key}={list(pair)}: use [low, high] with low <= high{bound}")
    return pair


class _Transform:
    """One transform of the batch pipeline: `draw` its parameters for one sample from that sample's
    generator, `apply` them to the batch. `p` is the chance that a sample gets it (torchio's `p`)."""

    keys: tuple[str, ...] = ()
    geometric = False  # moves voxels (and the body mask): runs on the whole cube, see `BatchAugment`
    reach = 0  # how many voxels along X an output voxel mixes, each side (a kernel's radius)

    def __init__(self, name: str, kwargs: dict):
        unknown = set(kwargs) - set(self.keys) - {"p"}
        if unknown:
            raise ConfigError(
                f"data.augment.{name} has no argument {', '.join(sorted(unknown))}; its arguments: "
                f"{', '.join(self.keys + ('p',))}"
            )
        self.name, self.p = name, float(kwargs.get("p", 1.0))

    def draw(self, gen: Draws) -> list[float]:
        raise NotImplementedError

    def matrices(self, params: torch.Tensor) -> torch.Tensor:
        """A geometric transform's (B, 3, 4) output-to-input maps in voxels about the cube's centre:
        consecutive geometric transforms compose into one resampling (`BatchAugment`)."""
        raise NotImplementedError

    def apply(self, image: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def __call__(self, image: torch.Tensor, params: torch.Tensor, mask: torch.Tensor | None, have=None, need=None):
        """(image, mask) transformed; only the geometric transforms move the body mask. `have` and
        `need` (lo, hi, n; None: all n): the X rows of the cube that the batch holds, and the ones
        to return (see `BatchAugment.plan`)."""
        return _cut(self.apply(image, params), have, need), _cut(mask, have, need)


def _span(have, need) -> slice:
    """Where the X rows `need` (lo, hi, n) lie in a batch that holds the rows `have` (None: all)."""
    start = 0 if have is None else have[0]
    return slice(need[0] - start, need[1] - start)


def _cut(x: torch.Tensor | None, have, need) -> torch.Tensor | None:
    """The X rows `need` of a (B, C, X, Y, Z) batch that holds the rows `have`; a `need` or an `x`
    of None: `x` as it is."""
    return x if x is None or need is None else x[:, :, _span(have, need)]


def _place(x: torch.Tensor | None, shape, lo: int, hi: int) -> torch.Tensor | None:
    """A batch of X rows lo:hi put back into zero cubes of the spatial `shape`; None stays None."""
    if x is None:
        return None
    out = x.new_zeros((*x.shape[:2], *shape))
    out[:, :, lo:hi] = x
    return out


class Draws:
    """A sample's stream of uniform numbers in [0, 1), from numpy's generator keyed by `key`, taken
    64 at a time: one scalar draw each costs more than the batch's whole resampling on a CPU."""

    def __init__(self, key: int):
        self.rng, self.left = np.random.default_rng(key), []

    def random(self) -> float:
        if not self.left:
            self.left = self.rng.random(64).tolist()[::-1]
        return self.left.pop()


def _uniform(gen: Draws, lo: float, hi: float) -> float:
    return lo + (hi - lo) * gen.random()


class RandomFlip(_Transform):
    keys = ("axes", "flip_probability")
    geometric = True

    def __init__(self, name, kwargs):
        super().__init__(name, kwargs)
        axes = kwargs.get("axes", [0])
        self.axes = [int(a) for a in (axes if isinstance(axes, (list, tuple)) else [axes])]
        if any(a not in (0, 1, 2) for a in self.axes):
            raise ConfigError(f"data.augment.{name}.axes={axes}: use 0, 1 or 2 (the ROI's X, Y, Z)")
        self.chance = float(kwargs.get("flip_probability", 0.5))

    def draw(self, gen):
        return [float(_uniform(gen, 0, 1) < self.chance) for _ in self.axes]

    def apply(self, image, params):
        for k, axis in enumerate(self.axes):
            image = torch.where(_per_sample(params[:, k], image).bool(), image.flip(2 + axis), image)
        return image

    def __call__(self, image, params, mask, have=None, need=None):
        mask = None if mask is None else self.apply(mask, params)
        return _cut(self.apply(image, params), have, need), _cut(mask, have, need)

    def matrices(self, params):
        """Mirrors about the centre: -1 on the flipped axes."""
        signs = torch.ones(len(params), 3, dtype=params.dtype, device=params.device)
        for k, axis in enumerate(self.axes):
            signs[:, axis] = torch.where(params[:, k].bool(), -signs[:, axis], signs[:, axis])
        return torch.cat([torch.diag_embed(signs), torch.zeros_like(signs)[:, :, None]], dim=2)


class RandomAffine(_Transform):
    """Scale, rotation (degrees about each axis) and translation (voxels) about the cube's centre,
    drawn per axis as torchio does; trilinear, the outside filled with the sample's minimum."""

    keys = ("scales", "degrees", "translation", "isotropic")
    geometric = True

    def __init__(self, name, kwargs):
        super().__init__(name, kwargs)
        self.scales = _range(name, "scales", kwargs.get("scales", 0.1), around=1.0, low=0.0)
        self.degrees = _range(name, "degrees", kwargs.get("degrees", 10))
        self.translation = _range(name, "translation", kwargs.get("translation", 0))
        self.isotropic = bool(kwargs.get("isotropic", False))

    def draw(self, gen):
        scales = [_uniform(gen, *self.scales) for _ in range(3)]
        if self.isotropic:
            scales = [scales[0]] * 3
        return scales + [_uniform(gen, *self.degrees) for _ in range(3)] + [_uniform(gen, *self.translation) for _ in range(3)]

    def matrices(self, params: torch.Tensor) -> torch.Tensor:
        """(B, 3, 4) output-to-input voxel maps: input = R S (output - centre) + centre + shift."""
        linear = rotation(params[:, 3:6]) @ torch.diag_embed(params[:, :3])
        return torch.cat([linear, params[:, 6:9, None]], dim=2)

    def __call__(self, image, params, mask, have=None, need=None):
        return resample(image, mask, self.matrices(params.to(image)), need)


def resample(image: torch.Tensor, mask: torch.Tensor | None, matrices: torch.Tensor, need=None):
    """(image, mask) resampled through the (B, 3, 4) voxel maps: the image trilinear, the outside
    filled with each sample's minimum, the mask nearest neighbour, zero outside. Only the `need` X
    rows of the output are sampled, from the whole cube (geometry runs before the batch is cut)."""
    grid = affine_grid(matrices.to(image), image.shape[2:], need)
    if mask is not None:
        moved = F.grid_sample(mask.to(grid.dtype), grid, mode="nearest", padding_mode="zeros", align_corners=True)
        mask = moved.to(mask.dtype)
    low = image.amin(dim=(1, 2, 3, 4), keepdim=True)
    return F.grid_sample(image - low, grid, mode="bilinear", padding_mode="zeros", align_corners=True) + low, mask


def compose(outer: torch.Tensor, inner: torch.Tensor) -> torch.Tensor:
    """(B, 3, 4) maps `outer` after `inner`: q -> outer(inner(q))."""
    linear = outer[:, :, :3] @ inner[:, :, :3]
    return torch.cat([linear, outer[:, :, :3] @ inner[:, :, 3:] + outer[:, :, 3:]], dim=2)


class RandomGamma(_Transform):
    keys = ("log_gamma",)

    def __init__(self, name, kwargs):
        super().__init__(name, kwargs)
        self.log_gamma = _range(name, "log_gamma", kwargs.get("log_gamma", 0.3))

    def draw(self, gen):
        return [math.exp(_uniform(gen, *self.log_gamma))]

    def apply(self, image, params):
        # exp(gamma log|x|): a third of `pow`'s time on a CPU, the same to 1e-7; |x| = 0 stays 0
        return image.abs().log_().mul_(_per_sample(params[:, 0], image)).exp_().copysign_(image)


class RandomBiasField(_Transform):
    keys = ("coefficients", "order")

    def __init__(self, name, kwargs):
        super().__init__(name, kwargs)
        self.coefficients = _range(name, "coefficients", kwargs.get("coefficients", 0.5))
        self.order = int(kwargs.get("order", 3))

    def draw(self, gen):
        return [_uniform(gen, *self.coefficients) for _ in range(bias_terms(self.order))]

    def apply(self, image, params, have=None):
        shape = image.shape[2:] if have is None else (have[2], *image.shape[3:])
        return image * bias_field(shape, params.to(image), self.order, have)

    def __call__(self, image, params, mask, have=None, need=None):
        return _cut(self.apply(image, params, have), have, need), _cut(mask, have, need)


class RandomKernel(_Transform):
    keys = ("gain", "sigma", "sigma_z")

    def __init__(self, name, kwargs):
        super().__init__(name, kwargs)
        self.gain = _range(name, "gain", kwargs.get("gain", (-1.0, 0.8)))
        self.sigma = _range(name, "sigma", kwargs.get("sigma", (0.5, 1.5)), symmetric=False, low=0.0)
        sigma_z = kwargs.get("sigma_z")
        self.sigma_z = None if sigma_z is None else _range(name, "sigma_z", sigma_z, symmetric=False, low=0.0)
        self.reach = math.ceil(3 * self.sigma[1])

    def draw(self, gen):
        gain, sigma = _uniform(gen, *self.gain), _uniform(gen, *self.sigma)
        return [gain, sigma, sigma if self.sigma_z is None else _uniform(gen, *self.sigma_z)]

    def apply(self, image, params, keep=None):
        largest = max(self.sigma[1], self.sigma[1] if self.sigma_z is None else self.sigma_z[1])
        return kernel_mtf(image, params[:, 0], params[:, 1], params[:, 2], largest, keep)

    def __call__(self, image, params, mask, have=None, need=None):
        if need is None:
            return self.apply(image, params), mask
        return self.apply(image, params, _span(have, need)), _cut(mask, have, need)


class RandomSliceThickness(_Transform):
    keys = ("thickness", "spacing")

    def __init__(self, name, kwargs):
        super().__init__(name, kwargs)
        self.thickness = _range(name, "thickness", kwargs.get("thickness", (1.0, 5.0)), symmetric=False, low=0.0)
        self.spacing = float(kwargs.get("spacing", 1.25))
        if self.spacing <= 0:
            raise ConfigError(f"data.augment.{name}.spacing={self.spacing}: use the ROI spacing in mm (> 0)")

    def draw(self, gen):
        return [_uniform(gen, *self.thickness) / self.spacing, _uniform(gen, 0.0, 1.0)]

    def apply(self, image, params):
        return slice_thickness(image, params[:, 0], params[:, 1])


class RandomCorrelatedNoise(_Transform):
    keys = ("hu", "grain", "hu_window")

    def __init__(self, name, kwargs):
        super().__init__(name, kwargs)
        self.hu = _range(name, "hu", kwargs.get("hu", (0.0, 30.0)), symmetric=False, low=0.0)
        self.grain = _range(name, "grain", kwargs.get("grain", (0.3, 2.0)), symmetric=False, low=0.0)
        self.hu_per_unit = hu_per_unit(kwargs.get("hu_window", (-250.0, 1250.0)))

    def draw(self, gen):
        seed = int(gen.random() * 2**52)  # the noise's own stream, on the device (exact as a float64)
        return [_uniform(gen, *self.hu) / self.hu_per_unit, _uniform(gen, *self.grain), float(seed)]

    def apply(self, image, params):
        dev = image.device
        noise = torch.stack(  # one FFT per sample: a batched FFT may round differently by batch size
            [
                correlated_noise(image.shape[1:], g, torch.Generator(dev).manual_seed(int(s)), dev)
                for g, s in zip(params[:, 1].tolist(), params[:, 2].tolist())
            ]
        )
        return image + _per_sample(params[:, 0], image) * noise.to(image.dtype)


class RandomHuOffset(_Transform):
    keys = ("hu", "hu_window")

    def __init__(self, name, kwargs):
        super().__init__(name, kwargs)
        self.hu = _range(name, "hu", kwargs.get("hu", (-20.0, 20.0)))
        self.hu_per_unit = hu_per_unit(kwargs.get("hu_window", (-250.0, 1250.0)))

    def draw(self, gen):
        return [_uniform(gen, *self.hu) / self.hu_per_unit]

    def apply(self, image, params):
        return image + _per_sample(params[:, 0], image)


BATCHED = {
    cls.__name__: cls
    for cls in (
        RandomFlip,
        RandomAffine,
        RandomGamma,
        RandomBiasField,
        RandomKernel,
        RandomSliceThickness,
        RandomCorrelatedNoise,
        RandomHuOffset,
    )
}


def _maps_if_on(t: _Transform, params: torch.Tensor) -> torch.Tensor:
    """A geometric transform's maps, the identity for the samples whose draw skipped it."""
    maps = t.matrices(params[:, :-1])
    identity = torch.eye(3, 4, dtype=maps.dtype, device=maps.device).expand_as(maps)
    return torch.where(params[:, -1].bool()[:, None, None], maps, identity)


class BatchAugment:
    """The training augmentation of a `{TransformName: kwargs}` spec, for a batch on any device.

    Each sample's parameters come from a generator seeded by (seed, epoch, index), drawn transform
    by transform in the spec's order, so a sample's augmentation does not depend on its batch, the
    device or the process that holds it. The body mask follows the geometric transforms (nearest).
    """

    def __init__(self, spec: dict, seed: int = 0):
        missing = sorted(set(spec) - set(BATCHED))
        if missing:
            raise ConfigError(
                f"data.augment.{missing[0]} has no batched version (batched: {', '.join(sorted(BATCHED))}); "
                "use data.augment_engine=torchio for torchio's own transforms"
            )
        self.transforms = [BATCHED[name](name, dict(kwargs or {})) for name, kwargs in spec.items()]
        self.seed = int(seed)
        # Runs of geometric transforms with an affine among them resample once, their maps composed
        # (a flip before an affine costs no pass of its own); {first: last} index of each run.
        self.runs, k = {}, 0
        while k < len(self.transforms):
            end = k
            while end + 1 < len(self.transforms) and self.transforms[k].geometric and self.transforms[end + 1].geometric:
                end += 1
            if end > k and any(isinstance(t, RandomAffine) for t in self.transforms[k : end + 1]):
                self.runs[k] = end
            k = end + 1

    def draw(self, index, epoch) -> list[torch.Tensor]:
        """Per transform a (B, P) float64 tensor of parameters, with a last column: applied (0 or 1)."""
        gens = []
        for i, e in zip(index, epoch):
            key = sample_seed(self.seed, int(e), int(i)) if int(e) >= 0 else int(torch.randint(2**62, ()))
            gens.append(Draws(key))
        out = []
        for t in self.transforms:
            rows = []
            for g in gens:
                on = t.p >= 1 or _uniform(g, 0, 1) < t.p
                rows.append([*t.draw(g), float(on)])
            out.append(torch.tensor(rows, dtype=torch.float64))
        return out  # on the host: each transform moves what it needs

    @torch.no_grad()
    def __call__(self, image: torch.Tensor, index, epoch, mask: torch.Tensor | None = None, reads=None):
        """(image, mask) of a (B, C, X, Y, Z) batch augmented; `index` and `epoch` per sample (an
        epoch below 0: a fresh draw from the global RNG).

        `reads` (lo, hi): the X rows the network reads (a 2.5D network's sagittal planes lie in
        rows 20-28 of 48). The geometric transforms then sample only those rows, widened by the
        kernel's reach, from the whole cube; each transform after works on the rows the rest still
        needs. The rows read come out as the whole cube's pipeline makes them (the noise is drawn on
        them alone: the same texture and SD, another draw), the other rows are zero."""
        shape = image.shape
        plan = [None] * (len(self.transforms) + 1) if reads is None else self.plan(reads, shape[2])
        image, mask = _cut(image, None, plan[0]), _cut(mask, None, plan[0])  # no geometry: cut at once
        params, k = self.draw(index, epoch), 0
        while k < len(self.transforms):
            end = self.runs.get(k, k)
            if end > k:
                maps = [_maps_if_on(self.transforms[j], params[j]) for j in range(k, end + 1)]
                image, mask = resample(image, mask, functools.reduce(compose, maps), plan[end + 1])
            else:
                image, mask = self._apply(self.transforms[k], params[k], image, mask, plan[k], plan[k + 1])
            k = end + 1
        if reads is None:
            return image, mask
        return _place(image, shape[2:], *reads), _place(mask, shape[2:], *reads)

    def plan(self, reads, n: int) -> list[tuple[int, int, int] | None]:
        """The X rows (lo, hi, n) the batch holds before the first transform and after each: the
        whole cube (None) until the last geometric transform, then the rows `reads` (lo, hi) widened
        by the reach of every transform still to come, within the cube's n rows."""
        lo, hi = (int(v) for v in reads)
        if not 0 <= lo < hi <= n:
            raise ValueError(f"reads={reads}: the network reads X rows outside a cube of {n}")
        last = max((k for k, t in enumerate(self.transforms) if t.geometric), default=-1)
        plan = []
        for k in range(-1, len(self.transforms)):
            margin = sum(t.reach for t in self.transforms[k + 1 :])
            plan.append(None if k < last else (max(0, lo - margin), min(n, hi + margin), n))
        return plan

    @staticmethod
    def _apply(t: _Transform, params: torch.Tensor, image, mask, have, need):
        """`t` on the samples whose draw applied it (the last column of `params`); the others are
        only cut from the rows `have` to `need`."""
        on = params[:, -1].bool()
        if bool(on.all()):
            return t(image, params[:, :-1], mask, have, need)
        base, base_mask = _cut(image, have, need), _cut(mask, have, need)
        if not bool(on.any()):
            return base, base_mask
        sel = on.nonzero().flatten()
        part_mask = None if mask is None else mask[sel.to(mask.device)]
        done, moved = t(image[sel.to(image.device)], params[sel, :-1], part_mask, have, need)
        base = base.index_copy(0, sel.to(image.device), done.to(image.dtype))
        if mask is not None:
            base_mask = base_mask.index_copy(0, sel.to(mask.device), moved)
        return base, base_mask
