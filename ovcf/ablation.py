"""Scores classifiers on synthetic cohorts rendered again, whole or with one CT cue switched off.

The sign ablation (`python -m ovcf.sign_ablation`) and leave-one-style-out validation
(`python -m ovcf.transfer`) both ask the same question of a model: how does it score a center
rendered with other settings (a style it never saw, a sign left out) while every other draw stays
the same? Each rendering is generated once into the data folder and reused.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from ovcf.errors import ConfigError
from ovcf.eval.metrics import binary_scores
from ovcf.inference.models import load_classifier, score
from ovcf.inference.runs import cohort_dataset, run_members
from ovcf.synth.anatomy import ablation_cues
from ovcf.synth.cohort import generate_cohort, synthetic_folder

log = logging.getLogger(__name__)


def load_models(source: Path, device) -> tuple[list, dict]:
    """The classifiers that score: a checkpoint file alone, or a run folder's test models (the fold
    ensemble of a `cv.folds` run, as its own external test); and the first one's data settings."""
    source = Path(source).expanduser()
    checkpoints = [ckpt for _, ckpt in run_members(source, "test")] if source.is_dir() else [source]
    loaded = [load_classifier(ckpt, device) for ckpt in checkpoints]
    return [task for task, _ in loaded], loaded[0][1]


def check_variants(synthetic: dict, signs) -> list[str]:
    """The cues to switch off: `signs` (checked against the generator's), or every cue when None."""
    cues = ablation_cues(synthetic["signs"])
    variants = list(signs) if signs else cues
    unknown = set(variants) - set(cues)
    if unknown:
        raise ConfigError(f"signs={sorted(unknown)}: choose from {', '.join(cues)}")
    return variants


def render(synthetic: dict, center: str, variant: str, data_dir: Path, workers: int, progress: bool) -> Path:
    """`center` of the cohort `synthetic` describes, with cue `variant` switched off ("none": all cues)."""
    params = synthetic | {"render_centers": [center], "plant": None, "ablate": [] if variant == "none" else [variant]}
    folder = synthetic_folder(Path(data_dir), params)
    if not (folder / "synth.json").exists():
        log.info(f"Rendering center {center}" + (f" without {variant}" if variant != "none" else ""))
        generate_cohort(folder, num_workers=workers, progress=progress, report=False, **params)
    return folder


def ablation_table(
    tasks: list,
    data: dict,
    synthetic: dict,
    center: str,
    variants: list[str],
    data_dir: Path,
    workers: int = 2,
    progress: bool = True,
) -> list[dict]:
    """AUROC of the models' mean probability on `center` rendered as `synthetic` says, then once per
    cue in `variants` switched off; `drop` is the loss against the full rendering.

    Args:
        tasks: classifiers trained with the data settings `data` (their ingest checks, ROI and window
            are used; ROIs come from the rendered cohort's own masks).
        synthetic: generator parameters (a run's, possibly with another `style_mix`).
    """
    if center not in synthetic["centers"]:
        raise ConfigError(f"center={center} is not a center of the model's cohort ({', '.join(sorted(synthetic['centers']))})")
    table, baseline, truth = [], None, []
    for variant in ["none", *variants]:
        folder = render(synthetic, center, variant, data_dir, workers, progress)
        dataset, _ = cohort_dataset(data, folder, None, workers, progress)
        probs = torch.stack([score(task, dataset) for task in tasks]).mean(0)
        auroc = binary_scores(dataset.labels.int(), probs)["auroc"]
        if variant == "none":  # the reference: which fractures carry each sign when nothing is switched off
            baseline, truth = auroc, json.loads((folder / "synth.json").read_text())["patients"]
        with_cue = sum(variant in f["signs"] for p in truth for f in p["fractures"])
        table.append(
            {
                "switched_off": variant,
                "auroc": round(auroc, 4),
                "drop": round(baseline - auroc, 4),
                "rows": len(dataset.rows),
                "fractures_with_sign": "" if variant in ("none", "collapse") else with_cue,
            }
        )
        log.info(f"{variant:>22}: AUROC {auroc:.3f} (drop {baseline - auroc:+.3f}, {len(dataset.rows)} rows)")
    return table
