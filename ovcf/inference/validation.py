"""External validation of trained classifiers, as the study reports it.

Every run of a sweep (or one run) is scored on the external center, or on another cohort: the
operating threshold is chosen on the development center's validation predictions and frozen, the
external rows are scored once at that threshold, and the results go to one folder: metrics,
predictions, ROC / confusion / calibration figures, a Grad-CAM gallery per model, the cohort flow,
`report.html` and an offline W&B run. The best model of a sweep is the one with the highest
validation AUROC (the leaderboard's rule); the others are compared with it by the paired DeLong test.

A run on a one-center cohort has no external center: without `cohort`, the same files report its
out-of-fold validation predictions instead (`"external": null`, `"scored": "val"`, a `note`), headed
as internal validation, without Grad-CAM.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

from ovcf.atomic import write_json, write_text
from ovcf.data.splits import one_center_note
from ovcf.errors import ConfigError
from ovcf.eval import figures, wandb_media
from ovcf.eval import metrics as M
from ovcf.eval.external import Scoring, evaluate_predictions, find_runs, metrics_markdown
from ovcf.eval.figures import slug
from ovcf.eval.gradcam import gallery
from ovcf.eval.predictions import COLUMNS, arrays, write_predictions
from ovcf.eval.report import write_report
from ovcf.inference.runs import run_predictions

log = logging.getLogger(__name__)


def evaluate(
    run: str | Path,
    out: str | Path | None = None,
    cohort: str | Path | None = None,
    predicted_masks: str | None = None,
    scoring: Scoring = Scoring(),
    device: str = "cpu",
    batch_size: int = 32,
    workers: int = 2,
    progress: bool = True,
    planned: dict | None = None,
    gradcam_cases: int = 2,
    wandb_mode: str | None = "offline",
    segmentation: str | Path | None = None,
) -> Path:
    """Predicts, scores and draws every run under `run`; returns the output folder."""
    runs = find_runs(Path(run))
    out = Path(out) if out else Path(run) / "evaluation"
    out.mkdir(parents=True, exist_ok=True)
    models, records, scored, external, cache = {}, [], {}, None, None
    for label, folder, _ in runs:
        log.info(f"Scoring {label} ({folder})")
        preds = run_predictions(folder, cohort, predicted_masks, device, batch_size, workers, progress)
        if models and preds["external"] != external:
            raise ConfigError(f"{folder} was tested on {preds['external']}, the others on {external}: evaluate them apart")
        external, cache = preds["external"], preds["cache"]
        models[label] = evaluate_predictions(preds["val"], preds["test"], scoring)
        models[label]["run"] = str(folder)
        scored[label] = preds["val"] if external is None else preds["test"]  # one center: validation is all there is
        if gradcam_cases and preds["dataset"] is not None:
            _, probs, _ = arrays(preds["test"])
            threshold = models[label]["threshold"]["value"]
            log.info(f"Grad-CAM gallery of {label}")
            models[label]["gradcam"] = gallery(
                preds["tasks"], preds["dataset"], probs, threshold, out / "gradcam" / slug(label), gradcam_cases
            )
        records += [{"model": label, **r} for r in preds["val"] + preds["test"]]
    best = runs[0][0]
    key = "test" if external is not None else "val"  # the rows the tables and figures report
    dev = (runs[0][2].get("centers") or {}).get("dev")
    comparisons = []
    ids = [(r["pseudonym"], r["level"]) for r in scored[best]]
    for label in list(models)[1:]:
        if [(r["pseudonym"], r["level"]) for r in scored[label]] != ids:
            raise ConfigError(f"{label} and {best} were scored on different rows: no paired test; evaluate them apart")
        y, p_other, _ = arrays(scored[label])
        _, p_best, _ = arrays(scored[best])
        comparisons.append({"model": label, "against": best, **M.delong_test(y, p_other, p_best)})
    planned = M.buderer_sample_size(**(planned or {}))
    t = models[best][key]
    report = {
        "external": None if external is None else str(external),
        "dev_center": dev,
        "scored": key,
        **({} if external is not None else {"note": one_center_note(dev)}),
        "threshold_rule": scoring.rule if scoring.rule != "sensitivity" else f"sensitivity >= {scoring.sensitivity}",
        "ci": scoring.ci,
        "alpha": scoring.alpha,
        "best": best,
        "selected_by": "validation AUROC (development center)",
        "models": models,
        "comparisons": comparisons,
        "precision": {
            "planned": {"error": planned["inputs"]["error"], "acute": planned["acute"], "chronic": planned["chronic"]},
            "acute": t["sensitivity"]["n"],
            "chronic": t["specificity"]["n"],
            "sensitivity_half_width": (t["sensitivity"]["high"] - t["sensitivity"]["low"]) / 2,
            "specificity_half_width": (t["specificity"]["high"] - t["specificity"]["low"]) / 2,
        },
    }
    write_json(out / "metrics.json", report, indent=2)
    write_text(out / "metrics.md", metrics_markdown(report))
    write_predictions(out / "predictions.csv", records, ["model", *COLUMNS])

    curves = []
    for label, m in models.items():
        y, p, _ = arrays(scored[label])
        r = m[key]
        point = (1 - r["specificity"]["value"], r["sensitivity"]["value"])
        curves.append(
            {"label": label, "labels": y, "scores": p, "auc": r["auc"], "point": point, "calibration": m["calibration"]}
        )
        figures.confusion_figure(r["confusion"], out / f"confusion_{slug(label)}.png", f"{label}\nthreshold {r['threshold']:.3f}")
    titles = (f"External test: {external}", "Calibration, external test")
    if external is None:
        titles = (f"Internal validation: center {dev} (no external center)", "Calibration, internal validation")
    figures.roc_figure(curves, out / "roc.png", titles[0])
    figures.calibration_figure(curves, out / "calibration.png", titles[1])
    if cache is not None and (Path(cache) / "flow.png").is_file():
        shutil.copy(Path(cache) / "flow.png", out / "flow.png")  # the cohort flow diagram of the scored cohort
    best_run = runs[0][1]
    split_file = next((f for f in (best_run / "splits.json", best_run / "fold_0" / "splits.json") if f.is_file()), None)
    study = {
        "splits": json.loads(split_file.read_text()) if split_file else {},
        "seeds": {"training": runs[0][2].get("seed")} | ({"bootstrap": scoring.seed} if scoring.ci == "bootstrap" else {}),
    }
    write_report(out, report, study, Path(segmentation) if segmentation else None)
    if wandb_mode and wandb_mode != "disabled":
        log_wandb(out, report, scored, wandb_mode)
    return out


def log_wandb(out: Path, report: dict, scored: dict[str, list[dict]], mode: str) -> None:
    """One W&B run (offline by default) with every model's ROC, confusion matrix, cases and Grad-CAM
    (under `validation/` instead of `external/` for a one-center run)."""
    import wandb  # slow to import: only when W&B is on

    run = wandb.init(project="ovcf", job_type="evaluate", name=f"evaluate-{report['best']}", dir=str(out), mode=mode)
    key = report["scored"]
    prefix = "external" if key == "test" else "validation"  # one center: internal validation, not external
    media = wandb_media.metric_table(report["models"], key, prefix)
    media |= wandb_media.images(prefix, [out / "roc.png", out / "calibration.png"])
    for label, m in report["models"].items():
        y, p, _ = arrays(scored[label])
        ids = [f"{r['pseudonym']}:{r['level']}" for r in scored[label]]
        media |= wandb_media.case_media(f"{prefix}/{slug(label)}", ids, y, p, m["threshold"]["value"])
        media |= wandb_media.images(f"{prefix}/{slug(label)}", sorted((out / "gradcam" / slug(label)).glob("*.png")))
    run.log(media)
    run.summary.update({f"{prefix}/{slug(label)}/auc": m[key]["auc"]["value"] for label, m in report["models"].items()})
    run.finish()
