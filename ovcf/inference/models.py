"""Trained models, loaded and applied: a segmenter to a CT, a classifier to ROI cubes.

Evaluate, export, predict, segment and the sign ablation all load checkpoints and run networks
through these functions, so a model is fed at inference exactly as its data module fed it in
training (HU window, resampling, the count of levels).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage

from ovcf.contract import LEVEL_IDS
from ovcf.data.ct import read_ct
from ovcf.data.instances import Assignment
from ovcf.data.roi import window_hu
from ovcf.data.volume import Volume, load_nifti, mask_on_ct, resample_volume
from ovcf.errors import ConfigError
from ovcf.eval.metrics import dice, label_dice, matched_dice
from ovcf.tasks import ClassificationTask, SegmentationTask
from ovcf.tasks.checkpoint import build_task, load_state, load_weights, read_checkpoint


def _checkpoint(ckpt: str | Path, what: str) -> tuple[Path, dict]:
    path = Path(ckpt).expanduser()
    if not path.is_file():
        raise ConfigError(f"checkpoint {ckpt} not found; pass a checkpoint of a task={what} run")
    return path, read_checkpoint(path)


def _data_settings(raw: dict, path: Path) -> dict:
    data = raw.get("datamodule_hyper_parameters")
    if not data or "hu_window" not in data:
        raise ConfigError(f"{path} holds no data settings (HU window, ROI); it predates this ovcf: train it again")
    return data


def load_classifier(ckpt: str | Path, device: str = "cpu") -> tuple[ClassificationTask, dict]:
    """The ClassificationTask of a checkpoint, in eval mode, and its data module's settings."""
    path, raw = _checkpoint(ckpt, "classification")
    data = _data_settings(raw, path)
    task = build_task(ClassificationTask, classifier_hparams(raw.get("hyper_parameters"), path), path)
    return load_state(task, raw["state_dict"], path, device), data


def load_segmenter(ckpt: str | Path, device: str = "cpu") -> tuple[SegmentationTask, dict]:
    """The SegmentationTask of a checkpoint, in eval mode, and what it reads: HU window and volume spacing (mm)."""
    path, raw = _checkpoint(ckpt, "segmentation")
    data = _data_settings(raw, path)
    task = build_task(SegmentationTask, segmenter_hparams(raw.get("hyper_parameters"), path), path)
    task = load_state(task, raw["state_dict"], path, device)
    return task, {"hu_window": tuple(float(v) for v in data["hu_window"]), "spacing": float(data["volume_spacing"])}


def classifier_hparams(hparams, source: Path) -> dict:
    """The init args of a ClassificationTask, checked to be one of this ovcf version.

    The initial weights it was trained from (`model_kwargs.weights`, e.g. a pretrain file) are dropped:
    the checkpoint's own weights replace them, and that file need not exist where the model runs.
    """
    if not isinstance(hparams, dict) or "clinical" not in hparams:
        raise ConfigError(f"{source} is not a classification checkpoint of this ovcf version (train one with ovcf.train)")
    kwargs = {k: v for k, v in dict(hparams.get("model_kwargs") or {}).items() if k not in ("weights", "pretrained")}
    return {**hparams, "model_kwargs": kwargs}


def segmenter_hparams(hparams, source: Path) -> dict:
    """The init args of a SegmentationTask, checked to be one of this ovcf version."""
    if not isinstance(hparams, dict) or not {"model_name", "min_body_ml", "region_slab"} <= set(hparams):
        raise ConfigError(f"{source} is not a segmentation checkpoint of this ovcf version (train one with task=segmentation)")
    return hparams


def weights_task(cls: type, hparams: dict, weights: Path, device: str = "cpu"):
    """A task from its init args (JSON) and a safetensors file: what an exported system holds; nothing is unpickled."""
    check = classifier_hparams if cls is ClassificationTask else segmenter_hparams
    return load_weights(build_task(cls, check(hparams, weights), weights), weights, device)


@torch.no_grad()
def score(task: ClassificationTask, dataset, batch_size: int = 32) -> torch.Tensor:
    """Acute probabilities of every ROI of `dataset` (a `VertebraDataset`), in order."""
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size)
    device = next(task.parameters()).device
    probs = [torch.sigmoid(task.logits({k: v.to(device) for k, v in b.items() if k != "id"}).float()).cpu() for b in loader]
    return torch.cat(probs) if probs else torch.zeros(0)


@torch.no_grad()
def sign_scores(tasks: list[ClassificationTask], dataset, batch_size: int = 32) -> torch.Tensor | None:
    """Mean probability of each sign of `ovcf.contract.SIGNS` over the `tasks` that report signs (a fold ensemble
    averages its members), (N, len(SIGNS)); None when none of them has learned sign heads."""
    members = []
    for task in tasks:
        device = next(task.parameters()).device
        loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size)
        parts = [task.sign_probabilities(b["image"].to(device)) for b in loader]
        if parts and parts[0] is not None:
            members.append(torch.cat(parts).cpu())
    return torch.stack(members).mean(0) if members else None


def to_ct_grid(labels: np.ndarray, labels_affine: np.ndarray, ct_affine: np.ndarray, ct_shape) -> np.ndarray:
    """Nearest-neighbour copy of a label map onto the CT's voxels (both RAS affines); outside it, 0."""
    to_labels = np.linalg.inv(labels_affine) @ ct_affine  # CT voxel index -> label voxel index
    return ndimage.affine_transform(
        np.asarray(labels, np.uint8),
        to_labels[:3, :3],
        offset=to_labels[:3, 3],
        output_shape=tuple(int(n) for n in ct_shape),
        order=0,
        mode="constant",
        cval=0,
        prefilter=False,
    )


def segment_volume(task: SegmentationTask, image_hu: np.ndarray, spacing: float, hu_window) -> tuple[np.ndarray, Assignment]:
    """VerSe ids on the resampled grid of one CT (HU, RAS, `spacing` mm), and how the levels were counted."""
    image = torch.from_numpy(window_hu(image_hu, hu_window))[None, None]
    verse, assignment = task.predict_volume(image, (spacing,) * 3)
    return verse.cpu().numpy().astype(np.uint8), assignment


@dataclass
class Segmentation:
    """A segmenter's output for one CT: VerSe ids on its resampled grid, and how the levels were counted."""

    verse: np.ndarray
    affine: np.ndarray
    assignment: Assignment

    def on_grid(self, volume: Volume) -> np.ndarray:
        """The VerSe ids on `volume`'s own voxels (the canonical CT, or the series as read)."""
        return to_ct_grid(self.verse, self.affine, volume.affine, volume.array.shape)


def segment_ct(task: SegmentationTask, settings: dict, volume: Volume) -> Segmentation:
    """Segments and counts the vertebral bodies of a canonical CT at the segmenter's spacing and HU window."""
    image, _, affine = resample_volume(volume, None, settings["spacing"])
    verse, assignment = segment_volume(task, image, settings["spacing"], settings["hu_window"])
    return Segmentation(verse, affine, assignment)


def reference_scores(labels: np.ndarray, truth: np.ndarray) -> dict:
    """A predicted level map against a reference (VerSe ids, one grid): Dice per level (named), their mean,
    the bodies as one mask, and each reference body against its best-overlapping prediction, whatever its level."""
    names = {verse: level for level, verse in LEVEL_IDS.items()}
    per_level = {names.get(v, str(v)): d for v, d in label_dice(labels, truth).items()}
    matched = {names.get(v, str(v)): d for v, d in matched_dice(labels, truth).items()}
    return {
        "dice": per_level,
        "mean_dice": float(np.mean(list(per_level.values()))) if per_level else float("nan"),
        "body_dice": dice(labels > 0, truth > 0),
        "matched_dice": matched,
        "mean_matched_dice": float(np.mean(list(matched.values()))) if matched else float("nan"),
    }


def check_on_ct(task: SegmentationTask, settings: dict, pairs, checks) -> list[dict]:
    """A trained segmenter scored on labelled CTs outside its cohort (`pairs` of {image, reference}: a NIfTI file
    or DICOM folder and a VerSe-id mask on its grid), as `ovcf.segment image= reference=` scores one: a check next
    to the validation Dice (a sweep still chooses by validation). A pair whose files are missing is skipped."""
    out = []
    for pair in pairs or []:
        image, reference = Path(str(pair["image"])).expanduser(), Path(str(pair["reference"])).expanduser()
        name = image.name.removesuffix(".gz").removesuffix(".nii")
        if not image.exists() or not reference.is_file():
            out.append({"name": name, "skipped": f"{image if not image.exists() else reference} not found"})
            continue
        canon = read_ct(image, checks).volume.canonical()
        segmentation = segment_ct(task, settings, canon)
        truth = mask_on_ct(load_nifti(reference), canon, "reference")
        a = segmentation.assignment
        out.append({"name": name, "levels": a.levels, "anchor": a.anchor} | reference_scores(segmentation.on_grid(canon), truth))
    return out
