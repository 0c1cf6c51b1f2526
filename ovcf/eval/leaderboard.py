"""The leaderboard of a sweep: one line per run, the best by the validation metric marked.

`python -m ovcf.train -m ...` calls `Leaderboard.on_multirun_end` (a Hydra callback, see
`conf/hydra/default.yaml`), which reads every job's `results.json` and writes `leaderboard.csv` and
`leaderboard.md` into the sweep folder. The best run is chosen on the validation metric alone
(`optimized_metric`); the external test columns are reported, never used to choose.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
from hydra.experimental.callback import Callback

from ovcf.atomic import write_csv, write_text


def collect(sweep_dir: Path) -> list[dict]:
    """`results.json` of every finished job under `sweep_dir` (a failed job has none), with its folder."""
    runs = []
    for path in sorted(Path(sweep_dir).glob("*/results.json"), key=lambda p: (len(p.parent.name), p.parent.name)):
        result = json.loads(path.read_text())
        result["run"] = path.parent.name
        runs.append(result)
    return runs


def _number(value) -> float:
    return float(value) if isinstance(value, (int, float)) and not math.isnan(float(value)) else float("nan")


REPORTED = ("body_dice", "dice_fractured", "dice_intact", "level_accuracy", "auroc", "sensitivity", "specificity", "accuracy")


def anchor_words(anchor: str) -> str:
    """How a count of levels was anchored (`ovcf.data.instances.Assignment.anchor`), in words."""
    where = {"regions": "a region boundary", "pelvis": "the pelvis"}.get(anchor)
    return f"anchored at {where}" if where else "not anchored"


def check_line(check: dict) -> str:
    """One real-CT check of a segmenter (`ovcf.inference.models.check_on_ct`) in words."""
    if check.get("skipped"):
        return f"{check['name']}: skipped ({check['skipped']})"
    levels = check["levels"]
    named = f"{levels[0]}-{levels[-1]}" if levels else "no level"
    return (
        f"{check['name']}: {named}, {anchor_words(check['anchor'])}, level Dice {check['mean_dice']:.3f}, "
        f"body Dice {check['body_dice']:.3f}"
    )


def rows(runs: list[dict], metric: str) -> list[dict]:
    """Leaderboard rows, best validation `metric` first; `best` marks the winner."""
    key = metric.removeprefix("val/")
    shared = set.intersection(*(set(r.get("overrides", [])) for r in runs)) if runs else set()
    table = []
    for r in runs:
        row = {"run": r["run"], "model": r["model"]}
        variant = [o for o in r.get("overrides", []) if o not in shared and not o.startswith("model=")]
        if variant:
            row["variant"] = " ".join(variant)  # what else tells this run apart (e.g. model.clinical=true)
        row[f"val_{key}"] = _number(r["val"].get(key))
        if "val_sd" in r:  # cross-validation: mean and sd over folds
            row[f"val_{key}_sd"] = _number(r["val_sd"].get(key))
            row["folds"] = r["cv"]["folds"]
        test = r["test"] or {}  # None: a one-center cohort, no external test
        row[f"test_{key}"] = _number(test.get(key))
        for name in REPORTED:
            if name != key and name in test:
                row[f"test_{name}"] = _number(test[name])
        per_level = r.get("per_level_dice", {}).get("test")
        if per_level:
            row["test_dice_per_level"] = " ".join(f"{level}:{dice:.3f}" for level, dice in per_level.items())
        done = [c for c in r.get("check") or [] if not c.get("skipped")]
        if done:  # a segmenter on labelled CTs outside the cohort: beside the choice, not in it
            row["check_level_dice"] = float(np.mean([c["mean_dice"] for c in done]))
            row["check_body_dice"] = float(np.mean([c["body_dice"] for c in done]))
            row["check"] = "; ".join(check_line(c) for c in done)
        row["params_m"] = round(r["params"] / 1e6, 2) if "params" in r else float("nan")
        row["fit_minutes"] = round(r["fit_seconds"] / 60, 1) if "fit_seconds" in r else float("nan")
        table.append(row)
    table.sort(key=lambda row: -row[f"val_{key}"] if not math.isnan(row[f"val_{key}"]) else math.inf)
    for i, row in enumerate(table):
        row["best"] = "*" if i == 0 and not math.isnan(row[f"val_{key}"]) else ""
    return table


def _cell(value, column: str = "") -> str:
    if column in ("params_m", "fit_minutes") and isinstance(value, float) and not math.isnan(value):
        return f"{value:g}"  # already rounded
    if isinstance(value, float):
        return "" if math.isnan(value) else f"{value:.3f}" if abs(value) < 10 else f"{value:.1f}"
    return str(value)


def write_leaderboard(sweep_dir: str | Path, metric: str) -> Path | None:
    """Writes `leaderboard.csv` and `leaderboard.md` in `sweep_dir`; returns the Markdown path (None: no results)."""
    sweep_dir = Path(sweep_dir)
    table = rows(collect(sweep_dir), metric)
    if not table:
        return None
    heading = [
        f"# Leaderboard: {sweep_dir.name}",
        "",
        f"Ranked by {metric} (validation, development center); test = external center, never used to choose; "
        "check = labelled CTs outside the cohort (check_ct=), never used to choose either.",
    ]
    return write_tables(sweep_dir, table, heading)


def write_tables(folder: Path, table: list[dict], heading: list[str], cell: Callable[[object, str], str] = _cell) -> Path:
    """`leaderboard.csv` and `leaderboard.md` (under `heading`) of `table`, ranked rows with a `best`
    column, in `folder`: a sweep's runs here, an Optuna study's trials in ovcf.tune. Returns the
    Markdown path."""
    columns = list(dict.fromkeys(["best", *(k for row in table for k in row if k != "best")]))
    write_csv(folder / "leaderboard.csv", table, columns, restval="")
    lines = [
        *heading,
        "",
        "| " + " | ".join(columns) + " |",
        "|" + "---|" * len(columns),
        *("| " + " | ".join(cell(row.get(c, ""), c) for c in columns) + " |" for row in table),
    ]
    path = folder / "leaderboard.md"
    write_text(path, "\n".join(lines) + "\n")
    return path


def announce(sweep_dir: str | Path, metric: str) -> None:
    """Writes the sweep's leaderboard and prints the winner (printed, not logged: see `Leaderboard`)."""
    path = write_leaderboard(sweep_dir, metric)
    if path is None:
        print(f"No finished runs under {sweep_dir}: no leaderboard")
        return
    best = rows(collect(path.parent), metric)[0]
    value = best["val_" + metric.removeprefix("val/")]
    print(f"Best by {metric}: {best['model']} (run {best['run']}, {value:.3f})")
    print(f"Leaderboard: {path} (and leaderboard.csv)")


class Leaderboard(Callback):
    """Hydra callback: writes the sweep's leaderboard when a multirun ends and prints the winner."""

    def on_multirun_end(self, config, **kwargs) -> None:
        # Printed, not logged: this runs in the sweep's own process after its jobs, where the logging set
        # up is the last job's (its <job>.log would get the sweep's summary), or Hydra's under a launcher.
        metric = config.get("optimized_metric")
        if metric:
            announce(Path(config.hydra.sweep.dir), metric)
