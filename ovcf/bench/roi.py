"""`python -m ovcf.bench.roi`: what an ROI resolution shows and what it costs.

Two figures decide `data.roi_size` and `data.roi_spacing`. The contrast of a fracture line
(a lucent plane 0.8-1.6 mm wide through cancellous bone, as the phantom draws it) that survives
a scanner and the ROI's resampling depends on the spacing alone; the time per training step
depends on the size alone. The line is scanned by each center's protocol of the default
synthetic config (kernel, slice profile; no noise), cut with `cut_roi` and measured on the
ROI voxels nearest the plane against those 4 mm or more away, over random orientations and
positions. Its noise is measured apart, as the SD of the ROI of noise alone.
"""

from __future__ import annotations

import argparse
import logging
import time
from functools import partial

import numpy as np
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from ovcf.cli import config_dir, setup_logging
from ovcf.data.roi import RoiSpec, cut_roi
from ovcf.data.volume import Volume
from ovcf.models import list_models
from ovcf.synth.phantom import Grid
from ovcf.synth.scanner import Scanner, acquire
from ovcf.tasks import ClassificationTask

log = logging.getLogger(__name__)

CANCELLOUS_HU, LINE_HU = 120.0, 40.0  # osteoporotic cancellous bone; the line holds blood (the phantom's tissues)
FIELD_MM = 40.0  # side of the scanned block around the line


def _scan(scanner: Scanner, ideal_fn, rng: np.random.Generator) -> Volume:
    """A block of `FIELD_MM` on the scanner's grid, painted by `ideal_fn(points_mm)` and acquired."""
    spacing = np.array([scanner.pixel_spacing, scanner.pixel_spacing, scanner.slice_spacing])
    shape = np.ceil(FIELD_MM / spacing).astype(int)
    origin = -(shape - 1) / 2 * spacing
    axes = [origin[i] + spacing[i] * np.arange(shape[i]) for i in range(3)]
    points = np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1)
    image = acquire(ideal_fn(points).astype(np.float32), Grid(*axes), scanner, rng)
    return Volume(image, np.vstack([np.hstack([np.diag(spacing), origin[:, None]]), [0, 0, 0, 1]]))


def _line_hu(points: np.ndarray, p0: np.ndarray, normal: np.ndarray, width_mm: float) -> np.ndarray:
    """Cancellous bone crossed by a lucent plane through `p0`, with the phantom's soft edge."""
    occupancy = np.clip((width_mm / 2 - np.abs((points - p0) @ normal)) / 0.5 + 0.5, 0.0, 1.0)
    return CANCELLOUS_HU + occupancy * (LINE_HU - CANCELLOUS_HU)


def line_contrast(scanner: Scanner, roi_spacing: float, width_mm: float, planes: int = 16, seed: int = 0) -> float:
    """The share of a line's true contrast (`CANCELLOUS_HU - LINE_HU`) seen on the ROI voxels nearest it."""
    rng = np.random.default_rng(seed)
    quiet = Scanner(**{**scanner.__dict__, "noise_hu": 0.0, "hu_offset": 0.0})
    size = int(np.ceil(24.0 / roi_spacing))  # a 24 mm cube around the line is enough to measure it
    depths = []
    for _ in range(planes):
        normal = rng.normal(size=3) * np.array([1.0, 1.0, 0.7])  # as the phantom draws them
        normal /= np.linalg.norm(normal)
        p0 = rng.uniform(-1.0, 1.0, 3)
        centre = rng.uniform(-0.5, 0.5, 3)  # off the scanner's grid, as a body's centre is
        ideal = partial(_line_hu, p0=p0, normal=normal, width_mm=width_mm)
        roi, _, spacing = cut_roi(_scan(quiet, ideal, rng), None, centre, RoiSpec(size, roi_spacing))
        axes = (np.arange(size) - (size - 1) / 2) * spacing
        points = np.stack(np.meshgrid(*(axes,) * 3, indexing="ij"), axis=-1) + centre
        dist = np.abs((points - p0) @ normal)
        inner = np.linalg.norm(points - centre, axis=-1) < 9.0
        near, far = roi[(dist < spacing / 2) & inner], roi[(dist > 4.0) & inner]
        depths.append((far.mean() - near.mean()) / (CANCELLOUS_HU - LINE_HU))
    return float(np.mean(depths))


def roi_noise(scanner: Scanner, roi_spacing: float, seed: int = 0) -> float:
    """The noise SD (HU) in the ROI of a uniform block scanned by `scanner`."""
    volume = _scan(scanner, lambda points: np.full(points.shape[:-1], CANCELLOUS_HU), np.random.default_rng(seed))
    roi, _, _ = cut_roi(volume, None, np.zeros(3), RoiSpec(int(np.ceil(24.0 / roi_spacing)), roi_spacing))
    return float((roi.astype(np.float32) - scanner.hu_offset).std())


def step_seconds(model: str, size: int, batch_size: int = 16, steps: int = 3) -> float:
    """Seconds per training step (forward, backward, AdamW) of `model` on a batch of `size`^3 cubes."""
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = compose("train", overrides=[f"model={model}", f"data.roi_size={size}", "paths.output_dir=."])
    torch.manual_seed(0)
    net = ClassificationTask(cfg.model.model_name, OmegaConf.to_container(cfg.model.model_kwargs, resolve=True))
    net.train()
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4)
    x, y = torch.rand(batch_size, cfg.data.in_channels, size, size, size), torch.randint(0, 2, (batch_size,)).float()
    times = []
    for _ in range(steps + 1):  # the first step warms up
        start = time.perf_counter()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(net(x).reshape(-1), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - start)
    return float(np.median(times[1:]))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--spacings", default="1.25,1.1,1.0,0.9,0.8", help="ROI spacings (mm) for the line contrast")
    parser.add_argument("--widths", default="0.8,1.2,1.6", help="line widths (mm)")
    parser.add_argument("--sizes", default="48,56,64", help="ROI sizes (voxels) for the step time; empty: none")
    parser.add_argument("--models", default="all", help="classifier configs, comma-separated, or all")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=16)
    args = parser.parse_args(argv)
    setup_logging()  # a benchmark is a command Hydra does not start: its console is set up here
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        centers = OmegaConf.to_container(compose("synth").centers, resolve=True)
    widths = [float(w) for w in args.widths.split(",")]
    log.info("line contrast (share of the true 80 HU seen on the nearest ROI voxels) and ROI noise SD")
    log.info(f"{'center':<8}{'spacing':>8}" + "".join(f"{f'{w} mm':>9}" for w in widths) + f"{'noise HU':>10}")
    for name, protocol in centers.items():
        scanner = Scanner(**protocol)
        for spacing in (float(s) for s in args.spacings.split(",")):
            shares = [line_contrast(scanner, spacing, w) for w in widths]
            cells = "".join(f"{s:9.2f}" for s in shares)
            log.info(f"{name:<8}{spacing:8.2f}{cells}{roi_noise(scanner, spacing):10.1f}")
    if not args.sizes:
        return
    sizes = [int(s) for s in args.sizes.split(",")]
    models = list_models("classification") if args.models == "all" else args.models.split(",")
    log.info(
        f"\nseconds per training step, batch {args.batch_size}, {torch.get_num_threads()} CPU threads (factor vs {sizes[0]})"
    )
    log.info(f"{'model':<16}" + "".join(f"{s:>16}" for s in sizes))
    for model in models:
        seconds = []
        for size in sizes:
            try:
                seconds.append(step_seconds(model, size, args.batch_size, args.steps))
            except Exception as err:  # a size the architecture cannot take: say so, go on
                log.info(f"{model} at {size}: {type(err).__name__}: {str(err).splitlines()[0][:120]}")
                seconds.append(float("nan"))
        log.info(f"{model:<16}" + "".join(f"{s:9.2f} ({s / seconds[0]:.2f}x)" for s in seconds))


if __name__ == "__main__":
    main()
