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

import logging
from pathlib import Path

import hydra
import nibabel as nib
import numpy as np
from omegaconf import DictConfig

from ovcf.atomic import write_csv, write_json
from ovcf.cli import device, hydra_main, resolve_cohort
from ovcf.data.ct import IngestChecks, read_ct
from ovcf.data.ingest import read_index
from ovcf.data.volume import load_nifti, mask_on_ct
from ovcf.errors import ConfigError
from ovcf.eval.leaderboard import anchor_words
from ovcf.inference.models import load_segmenter, reference_scores, segment_ct, segment_volume, to_ct_grid
from ovcf.parallel import track

log = logging.getLogger(__name__)


def segment_image(cfg: DictConfig, task, settings: dict) -> dict:
    """One CT (NIfTI file or one patient's DICOM folder, its series chosen as ingest chooses it): its level map."""
    path = Path(cfg.image).expanduser()
    choice = read_ct(path, IngestChecks.from_config(cfg.ingest))
    canon = choice.volume.canonical()
    segmentation = segment_ct(task, settings, canon)
    labels = segmentation.on_grid(canon)
    assignment = segmentation.assignment
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = path.name.removesuffix(".gz").removesuffix(".nii") if path.is_file() else path.name
    target = out / f"{stem}_levels.nii.gz"
    nib.save(nib.Nifti1Image(labels, canon.affine), target)
    result = {
        "levels": assignment.levels,
        "anchored": assignment.anchored,
        "anchor": assignment.anchor,
        "mask": str(target),
        "series": None if choice.series is None else choice.series.name,
        "notes": choice.notes,
    }
    log.info(f"Levels found: {', '.join(assignment.levels) or 'none'} ({anchor_words(assignment.anchor)})")
    if cfg.get("reference"):
        result |= reference_scores(labels, mask_on_ct(load_nifti(Path(cfg.reference).expanduser()), canon, "reference"))
        log.info("Dice per level: " + ", ".join(f"{k} {v:.3f}" for k, v in result["dice"].items()))
        log.info(
            f"Mean Dice {result['mean_dice']:.3f}; each body against its best-overlapping prediction, whatever its "
            f"level: {result['mean_matched_dice']:.3f}; all bodies as one mask: {result['body_dice']:.3f}"
        )
    write_json(out / f"{stem}_levels.json", result, indent=2)
    log.info(f"Mask: {target}")
    return result


def segment_cohort(cfg: DictConfig, task, settings: dict) -> dict:
    """Every patient whose CT the cohort's ingest cache holds: `<out>/<pseudonym>.nii.gz` and `segment.csv`."""
    resolve_cohort(cfg)
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
        verse, assignment = segment_volume(task, arrays["volume_image"], settings["spacing"], settings["hu_window"])
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
    write_csv(out / "segment.csv", rows, ["pseudonym", "center", "levels", "anchored", "missing", "note"])
    for line in warnings:
        log.warning(line)
    done = sum(1 for r in rows if not r["note"])
    log.info(f"{done} of {len(rows)} patients segmented; {len(warnings)} lack a named fractured level. Masks: {out}")
    log.info(f"Train a classifier on them: python -m ovcf.train data.roi_source=predicted data.predicted_masks={out}")
    return {"patients": len(rows), "segmented": done, "warnings": warnings, "out": str(out)}


def segment(cfg: DictConfig) -> dict:
    task, settings = load_segmenter(cfg.ckpt, device(cfg.device))
    if cfg.get("image"):
        return segment_image(cfg, task, settings)
    return segment_cohort(cfg, task, settings)


main = hydra_main("segment", segment)

if __name__ == "__main__":
    main()
