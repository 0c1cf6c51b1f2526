"""How prediction records become an external-validation table: the threshold rule and CIs.

The operating threshold is chosen on the development center's validation predictions and frozen;
the external center (or any later cohort) is then scored once at that threshold. A sweep's runs are
ranked by validation AUROC (the leaderboard's rule). `ovcf.inference.validation` applies this to
trained runs. A run on a one-center cohort has no external rows: its table is the validation one,
headed as internal validation.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from ovcf.errors import ConfigError
from ovcf.eval import metrics as M
from ovcf.eval.leaderboard import collect, rows
from ovcf.eval.predictions import arrays


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
    """Threshold from `val` records only, then the metrics of `val` and `test` at that threshold.

    No `test` records (a one-center run): "test" is None and the calibration is the validation
    predictions' (the only figures there are)."""
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
    kwargs = {"ci": scoring.ci, "n_boot": scoring.n_boot, "seed": scoring.seed, "alpha": scoring.alpha}
    scored = {
        "threshold": {
            "rule": rule,
            "value": threshold,
            "sensitivity_target": sensitivity,
            "chosen_on": f"validation ({len(yv)} rows)",
        },
        "val": M.diagnostic_metrics(yv, pv, threshold, gv, **kwargs) if len(set(yv.tolist())) == 2 else None,
    }
    if not test:
        if scored["val"] is None:
            raise ConfigError(
                f"the validation predictions ({len(yv)} rows) hold one class only and there is no external set: "
                "nothing to score; use a larger validation fold (data.val_fraction) or cv.folds"
            )
        return scored | {"test": None, "calibration": M.calibration(yv, pv)}
    yt, pt, gt = arrays(test)
    if len(set(yt.tolist())) < 2:
        raise ConfigError(f"the external rows ({len(yt)}) hold one class only: AUC and its CI need acute and chronic fractures")
    return scored | {"test": M.diagnostic_metrics(yt, pt, threshold, gt, **kwargs), "calibration": M.calibration(yt, pt)}


def find_runs(path: Path) -> list[tuple[str, Path, dict]]:
    """(label, folder, results) of a run folder, or of every finished classification run of a sweep
    folder, best validation AUROC first. Labels are model names, with what else tells runs apart."""
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
    """The results table (external test at the frozen threshold) and the paired comparisons; for a
    one-center run (`external` null) the validation table, headed as internal validation."""
    key = report.get("scored", "test")
    ci = f"95% CIs: AUC by DeLong; rates by {'Wilson' if report['ci'] == 'wilson' else 'patient-cluster bootstrap'}. Rates in %."
    if report["external"] is None:
        title = f"# Internal validation: center {report['dev_center']} (no external center)"
        chosen = "" if report["threshold_rule"] == "fixed" else ", chosen on these same rows, so the rates are optimistic"
        intro = f"{report['note']}. Out-of-fold validation predictions; threshold: {report['threshold_rule']}{chosen}."
    else:
        title = f"# External validation: {report['external']}"
        intro = f"Threshold: {report['threshold_rule']}, chosen on the development center's validation predictions and frozen."
    lines = [
        title,
        "",
        f"{intro} {ci}",
        "",
        "| best | model | n (acute) | AUC (95% CI) | sensitivity | specificity | accuracy | PPV | NPV | threshold | Brier |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for label, m in report["models"].items():
        t = m[key]
        lines.append(
            f"| {'*' if label == report['best'] else ''} | {label} | {t['n']} ({t['n_acute']}) | {M.ci_text(t['auc'])} | "
            + " | ".join(M.ci_text(t[name], pct=True) for name in M.RATES)
            + f" | {m['threshold']['value']:.3f} | {t['brier']:.3f} |"
        )
    if report["comparisons"]:
        lines += ["", f"Paired DeLong test against {report['best']} (same rows):", ""]
        lines += ["| model | AUC | best's AUC | best minus model | z | p |", "|---|---|---|---|---|---|"]
        for c in report["comparisons"]:
            cells = [c["model"], f"{c['auc_a']:.3f}", f"{c['auc_b']:.3f}", f"{-c['difference']:+.3f}", f"{-c['z']:.2f}"]
            lines.append("| " + " | ".join([*cells, M.p_value(c["p"])]) + " |")
    p = report["precision"]
    lines += [
        "",
        f"Precision: the protocol planned a CI half-width of {p['planned']['error']:.3f} for sensitivity and specificity "
        f"({p['planned']['acute']} acute + {p['planned']['chronic']} chronic, Buderer 1996); this "
        f"{'external' if key == 'test' else 'validation'} set "
        f"({p['acute']} acute, {p['chronic']} chronic) affords {p['sensitivity_half_width']:.3f} and "
        f"{p['specificity_half_width']:.3f} for the best model.",
    ]
    return "\n".join(lines) + "\n"
