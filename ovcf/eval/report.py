"""`report.html`: the study in one self-contained page (figures embedded, no server, no scripts
from elsewhere), with what a TRIPOD+AI or CLAIM reader looks for.

Sections carry ids (`cohort`, `segmentation`, `classification`, `roc`, `confusion`, `calibration`,
`gradcam`, `precision`, `methods`) so a browser test can check that each one rendered. A one-center
run's report (`external` null) shows its validation figures, headed as internal validation.
"""

from __future__ import annotations

import base64
import csv
import html
import json
import platform
from datetime import date
from importlib import metadata
from pathlib import Path

from ovcf.atomic import write_text
from ovcf.eval.figures import slug
from ovcf.eval.metrics import RATES, ci_text, p_value

SECTIONS = ("cohort", "segmentation", "classification", "roc", "confusion", "calibration", "gradcam", "precision", "methods")
PACKAGES = ("ovcf", "torch", "lightning", "monai", "timm", "torchio", "torchmetrics", "scikit-learn", "scipy", "numpy", "pydicom")

STYLE = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
h1{font-size:1.6em} h2{border-bottom:1px solid #ccc;padding-bottom:.2em;margin-top:1.8em}
table{border-collapse:collapse;font-size:.88em;margin:.6em 0} td,th{border:1px solid #ccc;padding:.25em .5em;text-align:right}
td:first-child,th:first-child,td.l{text-align:left} th{background:#f3f3f3} tr.best td{font-weight:600;background:#f4f9ff}
img{max-width:100%;height:auto;border:1px solid #eee} .fig img{max-width:560px}
.grid{display:flex;flex-wrap:wrap;gap:.6em} .grid img{max-width:340px}
.note{color:#555;font-size:.9em} dt{font-weight:600;margin-top:.5em} dd{margin-left:1.2em}
"""


def _img(path: Path, alt: str) -> str:
    """An <img> holding the PNG itself (a data URI), so the page needs no other file."""
    data = base64.b64encode(Path(path).read_bytes()).decode()
    return f'<img src="data:image/png;base64,{data}" alt="{html.escape(alt)}">'


def _ci(m: dict, pct: bool = False) -> str:
    return ci_text(m, pct, "&ndash;")


def _table(header: list[str], rows: list[list[str]], best: int | None = None) -> str:
    head = "".join(f"<th>{h}</th>" for h in header)
    body = "".join(
        f"<tr{' class=best' if i == best else ''}>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>"
        for i, row in enumerate(rows)
    )
    return f"<table><tr>{head}</tr>{body}</table>"


def versions(packages=PACKAGES) -> dict[str, str]:
    """Python's version and each installed package's (absent ones are left out)."""
    found = {"python": platform.python_version()}
    for name in packages:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return found


def _classification(report: dict) -> str:
    header = [
        "model",
        "n (acute)",
        "AUC (95% CI)",
        *(n.upper() if n in ("ppv", "npv") else n for n in RATES),
        "threshold",
        "Brier",
    ]
    rows, best = [], None
    for i, (label, m) in enumerate(report["models"].items()):
        t = m[report.get("scored", "test")]
        best = i if label == report["best"] else best
        rows.append(
            [html.escape(label), f"{t['n']} ({t['n_acute']})", _ci(t["auc"]), *(_ci(t[n], pct=True) for n in RATES)]
            + [f"{m['threshold']['value']:.3f}", f"{t['brier']:.3f}"]
        )
    ci = "Wilson score intervals" if report["ci"] == "wilson" else "a patient-level cluster bootstrap"
    chosen = f"The best model ({html.escape(report['best'])}, highlighted) was chosen by {html.escape(report['selected_by'])}"
    if report["external"] is None:
        text = (
            f"<p>{html.escape(report['note'])}. Out-of-fold validation predictions, with the threshold chosen on these "
            f"same rows (optimistic rates). {chosen}. AUC with a DeLong 95% CI; rates in %, with {ci}.</p>"
        )
    else:
        text = (
            f"<p>External test, center {html.escape(report['external'])}. {chosen}; the external center was never used "
            f"to choose. AUC with a DeLong 95% CI; rates in % at the frozen threshold, with {ci}.</p>"
        )
    out = text + _table(header, rows, best)
    if report["comparisons"]:
        comp = [
            [html.escape(c["model"]), f"{c['auc_a']:.3f}", f"{c['auc_b']:.3f}", f"{-c['difference']:+.3f}", p_value(c["p"])]
            for c in report["comparisons"]
        ]
        out += f"<p>Paired DeLong test against {html.escape(report['best'])} on the same rows:</p>"
        out += _table(["model", "AUC", "best's AUC", "best minus model", "p"], comp)
    return out


def _segmentation(folder: Path | None) -> str:
    if folder is None:
        return '<p class="note">No segmentation sweep given (pass <code>segmentation=DIR</code> to list its Dice).</p>'
    board = Path(folder) / "leaderboard.csv"
    if board.is_file():
        rows = list(csv.DictReader(open(board)))
        cols = [c for c in ("best", "model", "val_dice", "test_dice", "test_body_dice", "test_level_accuracy") if c in rows[0]]
        body = [[html.escape(r.get(c, "")) for c in cols] for r in rows]
        best = next((i for i, r in enumerate(rows) if r.get("best") == "*"), None)
        return "<p>Segmentation sweep, ranked by validation Dice; test = external center.</p>" + _table(cols, body, best)
    results = json.loads((Path(folder) / "results.json").read_text())
    return _table(
        ["model", "val Dice", "test Dice"],
        [[results["model"], f"{results['val']['dice']:.3f}", f"{results['test']['dice']:.3f}"]],
    )


def _gradcam(out: Path, report: dict) -> str:
    parts = [
        "<p>Grad-CAM of the acute logit (warm: raised the probability of an acute fracture), on sagittal and axial CT "
        "through the body centre in the input's bone window; the most confident true and false positives and negatives "
        "at the frozen threshold. CNNs: the last convolutional layer with at least 3 cells per side; ViTs: the patch "
        "embedding; the slice Transformer: its slice encoder.</p>"
    ]
    for label in report["models"]:
        pngs = sorted((out / "gradcam").glob(f"{slug(label)}/gradcam_*.png"))
        if not pngs:
            continue
        figs = "".join(_img(p, f"{label} {p.stem}") for p in pngs)
        block = f"<h3>{html.escape(label)}</h3><div class=grid>{figs}</div>"
        parts.append(block if label == report["best"] else f"<details><summary>{html.escape(label)}</summary>{block}</details>")
    return "".join(parts)


def _methods(report: dict, study: dict) -> str:
    splits = study.get("splits") or {}
    folds = splits.get("folds", [])
    dev_patients = sum(len(f["patients"]) for f in folds)
    test = splits.get("test")
    held_out = (
        f"{len(test['patients'])} external patients ({test['acute']} acute, {test['chronic']} chronic fractures) used only "
        "for this test."
        if test
        else "no external center in the training cohort (internal validation only)."
    )
    threshold = (
        "chosen on the validation predictions it is reported on (no external center)."
        if report["external"] is None
        else "chosen on the development center's validation predictions and frozen before the external test."
    )
    items = {
        "Data sources": f"Development center {html.escape(str(splits.get('dev_center', '?')))}, external center "
        f"{html.escape(str(report['external'] or 'none (internal validation only)'))}, in the ovcf cohort format "
        "(CT DICOM series, vertebral masks, one row per fractured vertebra).",
        "Reference standard": "Acute vs chronic from MRI bone-marrow oedema within 14 days of the CT "
        "(the cohort's label column).",
        "Eligibility": "Patients over 50 with an osteoporotic compression fracture; infection, tumour, cement or metal, "
        "and unusable images excluded at ingest (see the flow diagram).",
        "Splits": f"By patient, never by vertebra: {dev_patients} development patients in {len(folds)} folds "
        f"(seed {splits.get('seed', '?')}); {held_out}",
        "Model selection": html.escape(report["selected_by"]),
        "Threshold": f"{html.escape(report['threshold_rule'])}, {threshold}",
        "Statistics": "AUC with DeLong 95% CI; paired DeLong test between models; sensitivity, specificity, accuracy, "
        f"PPV and NPV with {'Wilson' if report['ci'] == 'wilson' else 'patient-cluster bootstrap'} 95% CIs; "
        "Brier score and calibration.",
        "Seeds": html.escape(", ".join(f"{k}: {v}" for k, v in study.get("seeds", {}).items()) or "n/a"),
        "Software": html.escape(", ".join(f"{k} {v}" for k, v in versions().items())),
    }
    return "<dl>" + "".join(f"<dt>{k}</dt><dd>{v}</dd>" for k, v in items.items()) + "</dl>"


def write_report(out: Path, report: dict, study: dict | None = None, segmentation: Path | None = None) -> Path:
    """Writes `out/report.html` from an evaluation folder (metrics.json's content and its figures)."""
    study = study or {}
    external = report.get("scored", "test") == "test"
    best = report["models"][report["best"]]["test" if external else "val"]
    # a one-center run reports its validation rows: no heading may call them external
    title, outcome, rows = (
        ("external validation", "external", "external")
        if external
        else ("internal validation", "internal validation", "validation")
    )
    p = report["precision"]
    confusion = "".join(_img(q, q.stem) for q in sorted(out.glob("confusion_*.png")))
    flow = _img(out / "flow.png", "cohort flow") if (out / "flow.png").is_file() else "<p class=note>No flow diagram found.</p>"
    sections = {
        "cohort": ("Cohort flow", f"<div class=fig>{flow}</div>"),
        "segmentation": ("Segmentation", _segmentation(segmentation)),
        "classification": (f"Classification: {title}", _classification(report)),
        "roc": ("ROC curves", f"<div class=fig>{_img(out / 'roc.png', 'ROC curves')}</div>"),
        "confusion": ("Confusion matrices", f"<div class=grid>{confusion}</div>"),
        "calibration": ("Calibration", f"<div class=fig>{_img(out / 'calibration.png', 'calibration')}</div>"),
        "gradcam": ("Grad-CAM gallery", _gradcam(out, report)),
        "precision": (
            "Sample size and precision",
            f"<p>The protocol planned {p['planned']['acute']} acute + {p['planned']['chronic']} chronic fractures "
            f"(Buderer 1996) for a CI half-width of {p['planned']['error']:.3f}. This {rows} set ({p['acute']} acute, "
            f"{p['chronic']} chronic) affords half-widths of {p['sensitivity_half_width']:.3f} (sensitivity) and "
            f"{p['specificity_half_width']:.3f} (specificity) for the best model.</p>",
        ),
        "methods": ("Methods checklist (TRIPOD+AI, CLAIM)", _methods(report, study)),
    }
    body = "".join(f'<section id="{key}"><h2>{title}</h2>{content}</section>' for key, (title, content) in sections.items())
    headline = (
        f"<p><b>Primary outcome:</b> {outcome} AUC {_ci(best['auc'])} for {html.escape(report['best'])}; "
        f"sensitivity {_ci(best['sensitivity'], True)}%, specificity {_ci(best['specificity'], True)}%.</p>"
    )
    page = (
        "<!DOCTYPE html><html lang=en><head><meta charset=utf-8>"
        "<title>ovcf study report</title>"
        f"<style>{STYLE}</style></head><body>"
        f"<h1>Acute vs chronic OVCF on CT: study report</h1><p class=note>ovcf, {date.today().isoformat()}</p>{headline}{body}"
        # counts the figures the browser actually decoded (a check for readers and for the browser test)
        "<script>addEventListener('load',()=>{document.body.dataset.imagesDecoded="
        "[...document.images].filter(i=>i.complete&&i.naturalWidth>0).length})</script>"
        "</body></html>"
    )
    path = out / "report.html"
    write_text(path, page)
    return path
