"""Grad-CAM heatmaps of the acute logit, brought back onto the ROI cube, and their overlays on CT.

MONAI's `GradCAM` computes the map at a target layer. Which layers can serve, and how a map there
returns to the (X, Y, Z) cube, depends on the network (a 2.5D net saw only a slab of sagittal
planes, a slice Transformer one map per slice), so each encoder declares both (`CamEncoder`); this
module only picks the layer, runs Grad-CAM and normalises, and so never changes for a new network.

The maps explain the acute logit: warm regions raised the probability of an acute fracture.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np
import torch
from torch import nn

from ovcf.errors import ConfigError


@runtime_checkable
class CamEncoder(Protocol):
    """What a classification encoder (`ClassificationTask.net`) declares for Grad-CAM."""

    def cam_layers(self) -> list[str]:
        """Candidate target layers, shallow to deep, as module names inside the encoder."""
        ...

    def cam_to_cube(self, raw: torch.Tensor, shape: tuple[int, int, int]) -> torch.Tensor:
        """A map at the chosen layer's resolution (as MONAI's `compute_map` gives it) as (B, X, Y, Z)."""
        ...


class _Logit(nn.Module):
    """The task as MONAI's CAM expects it: (B, 1) class scores, with clinical features as a keyword."""

    def __init__(self, task):
        super().__init__()
        self.task = task

    def forward(self, x: torch.Tensor, clinical: torch.Tensor | None = None) -> torch.Tensor:
        return self.task(x, clinical).reshape(-1, 1)


MIN_CELLS = 3  # the coarsest map side allowed: at a 48-voxel ROI, 1/16 resolution (16-voxel cells)


def _encoder(task) -> CamEncoder:
    """The task's encoder, or a ConfigError naming it when it does not declare its Grad-CAM layers."""
    net = task.net
    if not isinstance(net, CamEncoder) or not net.cam_layers():
        raise ConfigError(
            f"no Grad-CAM target layer is known for {type(net).__name__} ({task.hparams.model_name}): "
            "its encoder must define cam_layers() and cam_to_cube(raw, shape)"
        )
    return net


def candidates(task) -> list[str]:
    """The encoder's candidate layers as names inside `_Logit`, shallow to deep."""
    return [f"task.net.{name}" for name in _encoder(task).cam_layers()]


@torch.no_grad()
def target(task, images: torch.Tensor) -> str:
    """The deepest candidate layer whose map still has MIN_CELLS cells per side, as Grad-CAM takes the
    last convolutional layer where it can (the very last layers of a CNN see a 48-voxel ROI as 1 or 2
    cells, too coarse to point at anything)."""
    names = candidates(task)
    model, shapes, hooks = _Logit(task).eval(), {}, []

    def record(name: str):
        def hook(module, inputs, output) -> None:
            shapes[name] = output.shape

        return hook

    for name, module in model.named_modules():
        if name in names:
            hooks.append(module.register_forward_hook(record(name)))
    try:
        model(images[:1], torch.zeros(1, 3, device=images.device))
    finally:
        for h in hooks:
            h.remove()
    fine = [n for n in names if n in shapes and min(shapes[n][2:]) >= MIN_CELLS]
    return fine[-1] if fine else names[0]


def gradcam(task, images: torch.Tensor, clinical: torch.Tensor | None = None) -> np.ndarray:
    """Grad-CAM of the acute logit for a batch of ROI cubes (B, C, X, Y, Z): (B, X, Y, Z), each in [0, 1]."""
    from monai.visualize import GradCAM

    layer = target(task, images)
    cam = GradCAM(_Logit(task).eval(), target_layers=layer)  # MONAI restores the wrapper's mode afterwards
    kwargs = {} if clinical is None or not task.hparams.clinical else {"clinical": clinical}
    with torch.enable_grad(), warnings.catch_warnings():
        # the input needs no gradient; MONAI's hook on the target layer's output is what counts
        warnings.filterwarnings("ignore", message="Full backward hook is firing")
        raw = cam.compute_map(images, class_idx=0, **kwargs)
    cube = task.net.cam_to_cube(raw.detach(), tuple(images.shape[2:])).cpu()
    flat = cube.reshape(len(cube), -1)
    lo, hi = flat.min(1).values, flat.max(1).values
    cube = (cube - lo[:, None, None, None]) / (hi - lo).clamp(min=1e-8)[:, None, None, None]
    return cube.numpy()


def ensemble_gradcam(tasks: list, images: torch.Tensor, clinical: torch.Tensor | None = None) -> np.ndarray:
    """The mean of the (normalised) maps of several models, e.g. the fold models of a CV run."""
    return np.mean([gradcam(t, images, clinical) for t in tasks], axis=0)


def region_ratio(cam: np.ndarray, region: np.ndarray, within: np.ndarray | None = None) -> float:
    """Mean heat inside `region` over mean heat in the rest of `within` (default: the whole cube)."""
    within = np.ones_like(region, dtype=bool) if within is None else within.astype(bool)
    region = region.astype(bool) & within
    rest = within & ~region
    if not region.any() or not rest.any():
        raise ValueError("the region and the rest must both hold voxels")
    return float(cam[region].mean() / max(cam[rest].mean(), 1e-8))


def overlay_figure(cases: list[dict], path: Path, title: str = "") -> Path:
    """One row per case: sagittal and axial CT through the body centre (the input's window, i.e. bone),
    plain and with the heatmap. `cases`: {image (X, Y, Z) in [0, 1], cam (X, Y, Z), caption}."""
    from ovcf.eval.figures import pyplot

    plt = pyplot()
    fig, axes = plt.subplots(len(cases), 4, figsize=(7.2, 1.9 * len(cases) + 0.4), squeeze=False)
    for row, case in zip(axes, cases):
        image, cam = case["image"], case["cam"]
        x, _, z = (s // 2 for s in image.shape)
        # RAS cube: sagittal with cranial up and anterior left; axial with anterior up and the
        # patient's right on the left (the radiological convention)
        views = [
            (image[x].T[:, ::-1], cam[x].T[:, ::-1], "sagittal"),
            (image[:, :, z].T[:, ::-1], cam[:, :, z].T[:, ::-1], "axial"),
        ]
        for k, (ct, heat, name) in enumerate(views):
            origin = "lower"
            row[2 * k].imshow(ct, cmap="gray", vmin=0, vmax=1, origin=origin)
            row[2 * k + 1].imshow(ct, cmap="gray", vmin=0, vmax=1, origin=origin)
            row[2 * k + 1].imshow(heat, cmap="jet", alpha=0.4, vmin=0, vmax=1, origin=origin)
            row[2 * k].set_title(f"{name}", fontsize=7)
            row[2 * k + 1].set_title(f"{name}, Grad-CAM", fontsize=7)
        row[0].set_ylabel(case["caption"], fontsize=6.5)
        for ax in row:
            ax.set_xticks([])
            ax.set_yticks([])
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=200)
    plt.close(fig)
    return path


def outcome(label: int, probability: float, threshold: float) -> str:
    """TP, FP, TN or FN of one call at the frozen threshold."""
    call = probability >= threshold
    return ("T" if call == bool(label) else "F") + ("P" if call else "N")


def gallery(tasks: list, dataset, probabilities: np.ndarray, threshold: float, out: Path, per_outcome: int = 2) -> dict:
    """The most confident true/false positives/negatives of the external set, with their Grad-CAM:
    one PNG per outcome in `out` (`gradcam_TP.png` ...). Returns {outcome: [row ids]}."""
    out.mkdir(parents=True, exist_ok=True)
    labels = dataset.labels.int().numpy()
    groups: dict[str, list[int]] = {"TP": [], "FN": [], "TN": [], "FP": []}
    for i in np.argsort(-np.abs(probabilities - threshold)):  # the most confident first
        kind = outcome(labels[i], probabilities[i], threshold)
        if len(groups[kind]) < per_outcome:
            groups[kind].append(int(i))
    shown = {}
    for kind, idx in groups.items():
        if not idx:
            continue
        samples = [dataset[i] for i in idx]
        images = torch.stack([s["image"] for s in samples])
        clinical = torch.stack([s["clinical"] for s in samples])
        device = next(tasks[0].parameters()).device
        cams = ensemble_gradcam(tasks, images.to(device), clinical.to(device))
        cases = [
            {"image": s["image"][0].numpy(), "cam": c, "caption": f"{s['id']}\np={probabilities[i]:.2f}"}
            for s, c, i in zip(samples, cams, idx)
        ]
        overlay_figure(cases, out / f"gradcam_{kind}.png", f"{kind}: threshold {threshold:.3f}")
        shown[kind] = [s["id"] for s in samples]
    return shown
