"""`python -m ovcf.segment ckpt=PATH`: vertebral-body masks predicted by a trained segmenter.

Cohort mode (no `image=`): ingests the cohort as `ovcf.train` does (`data.*`), predicts every patient
whose CT the cache holds, and writes `<out>/<pseudonym>.nii.gz` on that CT's own voxels, VerSe ids,
plus `<out>/segment.csv` (levels found, whether the count was anchored, named fractured levels the
prediction lacks). A classifier then trains on them with
`data.roi_source=predicted data.predicted_masks=<out>`.

Image mode: `image=CT.nii.gz` (or a DICOM folder) writes `<out>/<stem>_levels.nii.gz` on that CT's
grid; with `reference=MASK.nii.gz` (VerSe ids on the same grid) it also prints the Dice per level.
"""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import hydra
import nibabel as nib
import numpy as np
import torch
from omegaconf import DictConfig

from ovcf.cli import check_overrides, config_dir, guarded
from ovcf.contract import LEVEL_IDS
from ovcf.errors import CohortError, ConfigError
from ovcf.progress import track

NAMES = {verse: level for level, verse in LEVEL_IDS.items()}


def load_segmenter(ckpt: str | Path, device: str = "cpu"):
    """The SegmentationTask of a checkpoint, and the data settings it was trained with (HU window, spacing)."""
    from ovcf.tasks import SegmentationTask

    path = Path(ckpt).expanduser()
    if not path.is_file():
        raise ConfigError(f"ckpt={ckpt}: no such checkpoint; pass the best checkpoint of a task=segmentation run")
    raw = torch.load(path, map_location="cpu", weights_only=False)
    if not {"model_name", "min_body_ml", "region_slab"} <= set(raw.get("hyper_parameters", {})):
        raise ConfigError(f"{path} is not a segmentation checkpoint of this ovcf version (train one with task=segmentation)")
    task = SegmentationTask.load_from_checkpoint(path, map_location=device)
    task.eval()
    data = raw.get("datamodule_hyper_parameters", {})
    return task, {
        "hu_window": tuple(data.get("hu_window", (-250.0, 1250.0))),
        "spacing": float(data.get("volume_spacing") or 2.0),
    }


def to_ct_grid(labels: np.ndarray, labels_affine: np.ndarray, ct_affine: np.ndarray, ct_shape) -> np.ndarray:
    """Nearest-neighbour copy of a label map onto the CT's voxels (both RAS affines); outside it, 0."""
    from scipy import ndimage

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


def predict(task, image_hu: np.ndarray, spacing: float, hu_window) -> tuple[np.ndarray, object]:
    """VerSe ids on the resampled grid of one CT (HU, RAS, `spacing` mm), and how the levels were counted."""
    from ovcf.data.datamodule import window_hu

    image = window_hu(image_hu, hu_window)[None, None]
    verse, assignment = task.predict_volume(image, (spacing,) * 3)
    return verse.cpu().numpy().astype(np.uint8), assignment


def level_dice(pred: np.ndarray, truth: np.ndarray) -> dict[str, float]:
    """Dice of every level present in `truth` (VerSe ids on one grid)."""
    out = {}
    for verse in sorted(int(v) for v in np.unique(truth) if v):
        t, p = truth == verse, pred == verse
        out[NAMES.get(verse, str(verse))] = float(2 * (t & p).sum() / (t.sum() + p.sum()))
    return out


def matched_dice(pred: np.ndarray, truth: np.ndarray) -> dict[str, float]:
    """Dice of every true body with the predicted body that overlaps it most, whatever level it was named.

    Separates outlining from naming: a count that is off by one level scores 0 in `level_dice` but
    full marks here when every body is outlined well.
    """
    out = {}
    for verse in sorted(int(v) for v in np.unique(truth) if v):
        t = truth == verse
        ids, counts = np.unique(pred[t], return_counts=True)
        counts, ids = counts[ids > 0], ids[ids > 0]
        if len(ids) == 0:
            out[NAMES.get(verse, str(verse))] = 0.0
            continue
        p = pred == ids[np.argmax(counts)]
        out[NAMES.get(verse, str(verse))] = float(2 * (t & p).sum() / (t.sum() + p.sum()))
    return out


def read_ct(path: Path):
    """A CT as a `Volume` (RAS): a NIfTI file, or a folder of DICOM files (its longest axial CT series)."""
    from ovcf.data.dicom import list_files, read_header
    from ovcf.data.series import ct_candidates, group_series, load_series
    from ovcf.data.volume import load_nifti

    if not path.exists():
        raise ConfigError(f"image={path}: no such file or folder (give a .nii/.nii.gz file or a DICOM folder)")
    if path.is_file():
        if not path.name.endswith((".nii", ".nii.gz")):
            raise ConfigError(f"image={path}: give a NIfTI file (.nii, .nii.gz) or a folder of DICOM files")
        return load_nifti(path)
    headers = [h for f in list_files(path) for h in read_header(f)[0]]
    candidates = ct_candidates(group_series(headers))
    if not candidates:
        raise CohortError(f"image={path}: no axial CT series among its {len(headers)} DICOM slices")
    return load_series(candidates[0])


def segment_image(cfg: DictConfig, task, settings: dict) -> dict:
    from ovcf.data.volume import Volume, load_nifti, mask_on_ct, resample_volume

    path = Path(cfg.image).expanduser()
    ct = read_ct(path)
    canon = ct.canonical()
    image, _, affine = resample_volume(canon, None, settings["spacing"])
    verse, assignment = predict(task, image, settings["spacing"], settings["hu_window"])
    labels = to_ct_grid(verse, affine, canon.affine, canon.array.shape)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = path.name.removesuffix(".gz").removesuffix(".nii") if path.is_file() else path.name
    target = out / f"{stem}_levels.nii.gz"
    nib.save(nib.Nifti1Image(labels, canon.affine), target)
    result = {"levels": assignment.levels, "anchored": assignment.anchored, "mask": str(target)}
    print(f"Levels found: {', '.join(assignment.levels) or 'none'} ({'anchored' if assignment.anchored else 'not anchored'})")
    if cfg.get("reference"):
        truth = mask_on_ct(load_nifti(Path(cfg.reference).expanduser()), Volume(canon.array, canon.affine), "reference")
        dice = level_dice(labels, truth)
        result["dice"] = dice
        result["mean_dice"] = float(np.mean(list(dice.values()))) if dice else float("nan")
        body = (labels > 0) & (truth > 0)
        result["body_dice"] = float(2 * body.sum() / ((labels > 0).sum() + (truth > 0).sum()))
        matched = matched_dice(labels, truth)
        result["matched_dice"] = matched
        result["mean_matched_dice"] = float(np.mean(list(matched.values()))) if matched else float("nan")
        print("Dice per level: " + ", ".join(f"{k} {v:.3f}" for k, v in dice.items()))
        print(
            f"Mean Dice {result['mean_dice']:.3f}; each body against its best-overlapping prediction, whatever its "
            f"level: {result['mean_matched_dice']:.3f}; all bodies as one mask: {result['body_dice']:.3f}"
        )
    (out / f"{stem}_levels.json").write_text(json.dumps(result, indent=2))
    print(f"Mask: {target}")
    return result


def segment_cohort(cfg: DictConfig, task, settings: dict) -> dict:
    from ovcf.data.ingest import read_index

    data = hydra.utils.instantiate(cfg.data, roi_source="given", predicted_masks=None, volume_spacing=settings["spacing"])
    data.prepare_data()
    index = read_index(data.cache)
    named: dict[str, set[str]] = {}
    centers: dict[str, str] = {}
    for r in index:
        named.setdefault(r["pseudonym"], set()).add(r["level"])
        centers[r["pseudonym"]] = r["center"]
    out = Path(cfg.out).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    rows, warnings = [], []
    for name in track(sorted(named), len(named), "Segmenting", enabled=cfg.progress):
        path = data.cache / "samples" / f"{name}.npz"
        if not path.exists():
            rows.append(
                {
                    "pseudonym": name,
                    "center": centers[name],
                    "levels": "",
                    "anchored": "",
                    "missing": "",
                    "note": "no readable CT",
                }
            )
            continue
        with np.load(path) as npz:
            if "ct_affine" not in npz:
                raise ConfigError(f"{path} predates predicted masks; delete {data.cache} so ingest caches it again")
            arrays = {k: npz[k] for k in ("volume_image", "volume_affine", "ct_affine", "ct_shape")}
        verse, assignment = predict(task, arrays["volume_image"], settings["spacing"], settings["hu_window"])
        labels = to_ct_grid(verse, arrays["volume_affine"], arrays["ct_affine"], arrays["ct_shape"])
        nib.save(nib.Nifti1Image(labels, arrays["ct_affine"]), out / f"{name}.nii.gz")
        missing = sorted(named[name] - set(assignment.levels))
        if missing:
            warnings.append(f"{name}: fractured level(s) {', '.join(missing)} missing from the prediction")
        rows.append(
            {
                "pseudonym": name,
                "center": centers[name],
                "levels": " ".join(assignment.levels),
                "anchored": assignment.anchored,
                "missing": " ".join(missing),
                "note": "",
            }
        )
    with open(out / "segment.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["pseudonym", "center", "levels", "anchored", "missing", "note"])
        writer.writeheader()
        writer.writerows(rows)
    for line in warnings:
        print(f"warning: {line}")
    done = sum(1 for r in rows if not r["note"])
    print(f"{done} of {len(rows)} patients segmented; {len(warnings)} lack a named fractured level. Masks: {out}")
    print(f"Train a classifier on them: python -m ovcf.train data.roi_source=predicted data.predicted_masks={out}")
    return {"patients": len(rows), "segmented": done, "warnings": warnings, "out": str(out)}


def segment(cfg: DictConfig) -> dict:
    device = "cuda" if cfg.device == "auto" and torch.cuda.is_available() else ("cpu" if cfg.device == "auto" else cfg.device)
    task, settings = load_segmenter(cfg.ckpt, device)
    if cfg.get("image"):
        return segment_image(cfg, task, settings)
    return segment_cohort(cfg, task, settings)


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="segment")
def main(cfg: DictConfig) -> None:
    guarded(segment, cfg)


if __name__ == "__main__":
    check_overrides(sys.argv[1:])
    main()
