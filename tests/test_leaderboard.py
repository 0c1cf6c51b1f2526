"""The sweep leaderboard ranks runs by the validation metric, never by the external test."""

from __future__ import annotations

import csv
import json

from ovcf.eval.leaderboard import rows, write_leaderboard


def _run(folder, model, val, test, **extra):
    folder.mkdir(parents=True)
    result = {
        "task": "segmentation",
        "model": model,
        "val": {"dice": val},
        "test": {"dice": test, "body_dice": test + 0.01, "dice_fractured": test - 0.02},
        "per_level_dice": {"test": {"L1": test, "L2": test}},
        "params": 5_700_000,
        "fit_seconds": 90.0,
        **extra,
    }
    (folder / "results.json").write_text(json.dumps(result))


def test_best_by_validation_not_by_test(tmp_path):
    _run(tmp_path / "0", "unet", val=0.90, test=0.80)
    _run(tmp_path / "1", "unetr_pp", val=0.85, test=0.95)  # better on the external test: must not win
    _run(tmp_path / "2", "umamba", val=0.88, test=0.70)
    (tmp_path / "3").mkdir()  # a failed job: no results.json
    path = write_leaderboard(tmp_path, "val/dice")
    table = list(csv.DictReader(open(tmp_path / "leaderboard.csv")))
    assert [r["model"] for r in table] == ["unet", "umamba", "unetr_pp"]
    assert [r["best"] for r in table] == ["*", "", ""]
    assert table[0]["params_m"] == "5.7" and table[0]["fit_minutes"] == "1.5"
    assert table[0]["test_dice_per_level"] == "L1:0.800 L2:0.800" and float(table[0]["test_dice_fractured"]) == 0.78
    text = path.read_text()
    assert "| * | 0 | unet | 0.900 | 0.800 |" in text and "never used to choose" in text


def test_nan_validation_ranks_last_and_empty_sweep_writes_nothing(tmp_path):
    _run(tmp_path / "0", "unet", val=float("nan"), test=0.9)
    _run(tmp_path / "1", "umamba", val=0.5, test=0.4)
    table = rows([json.loads((tmp_path / d / "results.json").read_text()) | {"run": d} for d in ("0", "1")], "val/dice")
    assert [r["model"] for r in table] == ["umamba", "unet"] and table[0]["best"] == "*"
    (tmp_path / "empty").mkdir()
    assert write_leaderboard(tmp_path / "empty", "val/dice") is None


def test_a_real_ct_check_is_reported_beside_the_choice_not_in_it(tmp_path):
    check = {"name": "example_ct", "levels": ["T12", "L1", "L5"], "anchor": "pelvis", "mean_dice": 0.78, "body_dice": 0.8}
    _run(tmp_path / "0", "unet", val=0.90, test=0.80, check=[check, {"name": "other", "skipped": "other not found"}])
    _run(tmp_path / "1", "unetr_pp", val=0.85, test=0.80, check=[check | {"mean_dice": 0.95, "anchor": ""}])
    path = write_leaderboard(tmp_path, "val/dice")
    table = list(csv.DictReader(open(tmp_path / "leaderboard.csv")))
    assert [r["model"] for r in table] == ["unet", "unetr_pp"] and table[0]["best"] == "*"  # the check does not choose
    assert float(table[0]["check_level_dice"]) == 0.78 and float(table[1]["check_level_dice"]) == 0.95
    assert table[0]["check"] == "example_ct: T12-L5, anchored at the pelvis, level Dice 0.780, body Dice 0.800"
    assert "not anchored" in table[1]["check"]
    assert "check = labelled CTs outside the cohort" in path.read_text()
