"""External validation of trained classifiers, as the study reports it.

The operating threshold is chosen on the development center's validation predictions and frozen;
the external center (or any later cohort) is then scored once at that threshold. The best model of
a sweep is the one with the highest validation AUROC (the leaderboard's rule); the others are
compared with it by the paired DeLong test on the same external rows.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

from ovcf.errors import ConfigError
from ovcf.eval import metrics as M
from ovcf.eval.figures import slug
from ovcf.eval.predictions import COLUMNS, arrays, write_predictions


@dataclass(frozen=True)
class Scoring:
    """How predictions become a results table: the threshold rule (youden, sensitivity with its
    target, or fixed 0.5) and the CIs (wilson, or a patient bootstrap of `n_boot` draws)."""

    rule: str = "youden"
    sensitivity: float | None = None
    ci: str = "wilson"
    n_boot: int = 2000
    seed: int = 0
    alpha: float = 0.05


def evaluate_predictions(val: list[dict], test: list[dict], scoring: Scoring = Scoring()) -> dict:
    """Threshold from `val` records only, then the metrics of `val` and `test` at that threshold."""
    rule, sensitivity = scoring.rule, scoring.sensitivity
    yv, pv, gv = arrays(val)
    if len(set(yv.tolist())) < 2 and rule != "fixed":
        raise ConfigError(
            f"the validation predictions ({len(yv)} rows) hold one class only: threshold rule {rule} needs both; "
            "use threshold.rule=fixed or a larger validation fold"
        )
    try:
        threshold = M.choose_threshold(yv, pv, rule, sensitivity)
    except ValueError as exc:
        raise ConfigError(f"threshold: {exc}") from exc
    yt, pt, gt = arrays(test)
    if len(set(yt.tolist())) < 2:
        raise ConfigError(f"the external rows ({len(yt)}) hold one class only: AUC and its CI need acute and chronic fractures")
    kwargs = {"ci": scoring.ci, "n_boot": scoring.n_boot, "seed": scoring.seed, "alpha": scoring.alpha}
    return {
        "threshold": {
            "rule": rule,
            "value": threshold,
            "sensitivity_target": sensitivity,
            "chosen_on": f"validation ({len(yv)} rows)",
        },
        "val": M.diagnostic_metrics(yv, pv, threshold, gv, **kwargs) if len(set(yv.tolist())) == 2 else None,
        "test": M.diagnostic_metrics(yt, pt, threshold, gt, **kwargs),
        "calibration": M.calibration(yt, pt),
    }


def find_runs(path: Path) -> list[tuple[str, Path, dict]]:
    """(label, folder, results) of a run folder, or of every finished classification run of a sweep
    folder, best validation AUROC first. Labels are model names, with what else tells runs apart."""
    from ovcf.leaderboard import collect, rows

    path = Path(path).expanduser()
    if not path.is_dir():
        raise ConfigError(f"run={path}: no such folder; pass a python -m ovcf.train run folder or a sweep folder")
    if (path / "results.json").is_file():
        results = json.loads((path / "results.json").read_text())
        return [(results["model"], path, results)]
    runs = [r for r in collect(path) if r.get("task") == "classification"]
    if not runs:
        raise ConfigError(f"{path} holds no finished task=classification run (no */results.json)")
    by_run = {r["run"]: r for r in runs}
    found = []
    for row in rows(runs, "val/auroc"):
        label = row["model"] + (f" ({row['variant']})" if row.get("variant") else "")
        found.append((label, path / row["run"], by_run[row["run"]]))
    return found


def metrics_markdown(report: dict) -> str:
    """The results table (external test at the frozen threshold) and the paired comparisons."""
    lines = [
        f"# External validation: {report['external']}",
        "",
        f"Threshold: {report['threshold_rule']}, chosen on the development center's validation predictions and frozen. "
        f"95% CIs: AUC by DeLong; rates by {'Wilson' if report['ci'] == 'wilson' else 'patient-cluster bootstrap'}. "
        "Rates in %.",
        "",
        "| best | model | n (acute) | AUC (95% CI) | sensitivity | specificity | accuracy | PPV | NPV | threshold | Brier |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for label, m in report["models"].items():
        t = m["test"]
        lines.append(
            f"| {'*' if label == report['best'] else ''} | {label} | {t['n']} ({t['n_acute']}) | {M.ci_text(t['auc'])} | "
            + " | ".join(M.ci_text(t[name], pct=True) for name in M.RATES)
            + f" | {m['threshold']['value']:.3f} | {t['brier']:.3f} |"
        )
    if report["comparisons"]:
        lines += ["", f"Paired DeLong test against {report['best']} (same external rows):", ""]
        lines += ["| model | AUC | best's AUC | best minus model | z | p |", "|---|---|---|---|---|---|"]
        for c in report["comparisons"]:
            cells = [c["model"], f"{c['auc_a']:.3f}", f"{c['auc_b']:.3f}", f"{-c['difference']:+.3f}", f"{-c['z']:.2f}"]
            lines.append("| " + " | ".join([*cells, M.p_value(c["p"])]) + " |")
    p = report["precision"]
    lines += [
        "",
        f"Precision: the protocol planned a CI half-width of {p['planned']['error']:.3f} for sensitivity and specificity "
        f"({p['planned']['acute']} acute + {p['planned']['chronic']} chronic, Buderer 1996); this external set "
        f"({p['acute']} acute, {p['chronic']} chronic) affords {p['sensitivity_half_width']:.3f} and "
        f"{p['specificity_half_width']:.3f} for the best model.",
    ]
    return "\n".join(lines) + "\n"


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
    from ovcf.eval import figures
    from ovcf.eval.gradcam import gallery
    from ovcf.eval.predictions import run_predictions
    from ovcf.eval.report import write_report

    runs = find_runs(Path(run))
    out = Path(out) if out else Path(run) / "evaluation"
    out.mkdir(parents=True, exist_ok=True)
    models, records, scored, external, cache = {}, [], {}, None, None
    for label, folder, _ in runs:
        print(f"Scoring {label} ({folder})")
        preds = run_predictions(folder, cohort, predicted_masks, device, batch_size, workers, progress)
        if external is not None and preds["external"] != external:
            raise ConfigError(f"{folder} was tested on {preds['external']}, the others on {external}: evaluate them apart")
        external, cache = preds["external"], preds["cache"]
        models[label] = evaluate_predictions(preds["val"], preds["test"], scoring)
        models[label]["run"] = str(folder)
        scored[label] = preds["test"]
        if gradcam_cases:
            _, probs, _ = arrays(preds["test"])
            threshold = models[label]["threshold"]["value"]
            print(f"Grad-CAM gallery of {label}")
            models[label]["gradcam"] = gallery(
                preds["tasks"], preds["dataset"], probs, threshold, out / "gradcam" / slug(label), gradcam_cases
            )
        records += [{"model": label, **r} for r in preds["val"] + preds["test"]]
    best = runs[0][0]
    comparisons = []
    ids = [(r["pseudonym"], r["level"]) for r in scored[best]]
    for label in list(models)[1:]:
        if [(r["pseudonym"], r["level"]) for r in scored[label]] != ids:
            raise ConfigError(f"{label} and {best} were scored on different external rows: no paired test")
        y, p_other, _ = arrays(scored[label])
        _, p_best, _ = arrays(scored[best])
        comparisons.append({"model": label, "against": best, **M.delong_test(y, p_other, p_best)})
    planned = M.buderer_sample_size(**(planned or {}))
    t = models[best]["test"]
    report = {
        "external": str(external),
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
    (out / "metrics.json").write_text(json.dumps(report, indent=2))
    (out / "metrics.md").write_text(metrics_markdown(report))
    write_predictions(out / "predictions.csv", records, ["model", *COLUMNS])

    curves = []
    for label, m in models.items():
        y, p, _ = arrays(scored[label])
        r = m["test"]
        point = (1 - r["specificity"]["value"], r["sensitivity"]["value"])
        curves.append(
            {"label": label, "labels": y, "scores": p, "auc": r["auc"], "point": point, "calibration": m["calibration"]}
        )
        figures.confusion_figure(r["confusion"], out / f"confusion_{slug(label)}.png", f"{label}\nthreshold {r['threshold']:.3f}")
    figures.roc_figure(curves, out / "roc.png", f"External test: {external}")
    figures.calibration_figure(curves, out / "calibration.png")
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
    """One W&B run (offline by default) with every model's ROC, confusion matrix, cases and Grad-CAM."""
    import wandb

    from ovcf.eval import wandb_media

    run = wandb.init(project="ovcf", job_type="evaluate", name=f"evaluate-{report['best']}", dir=str(out), mode=mode)
    media = wandb_media.metric_table(report["models"])
    media |= wandb_media.images("external", [out / "roc.png", out / "calibration.png"])
    for label, m in report["models"].items():
        y, p, _ = arrays(scored[label])
        ids = [f"{r['pseudonym']}:{r['level']}" for r in scored[label]]
        media |= wandb_media.case_media(f"external/{slug(label)}", ids, y, p, m["threshold"]["value"])
        media |= wandb_media.images(f"external/{slug(label)}", sorted((out / "gradcam" / slug(label)).glob("*.png")))
    run.log(media)
    run.summary.update({f"external/{slug(label)}/auc": m["test"]["auc"]["value"] for label, m in report["models"].items()})
    run.finish()
