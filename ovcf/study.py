"""`python -m ovcf.study`: the whole study in one command, resumable.

Stages, in order, each one a command a user could type (and the study prints it):
1. `segmentation`: `ovcf.train -m task=segmentation model=<study.segmenters>`, leaderboard by val Dice;
2. `masks`: `ovcf.segment` with the best segmenter's best checkpoint, on every patient;
3. `classification`: `ovcf.train -m model=<study.classifiers> cv.folds=<study.folds>` on ROIs cut from
   those predicted masks, leaderboard by the mean val AUROC over the patient folds;
4. `evaluation`: `ovcf.evaluate` of every classifier on the external center (`report.html`);
5. `system`: the chosen segmenter, classifier and frozen threshold exported for `ovcf.predict`.

On a CPU the runs of a sweep go side by side (`jobs`), each a plain `ovcf.train` run in the folder the
multirun would give it. Choices read validation metrics only. Everything lands in one folder, `logs/study/<name>`, with a
`study.json` manifest (config, versions, seeds, data hash, chosen models, stage times). Re-running
the same command skips finished stages; in an interrupted stage, runs that finished are kept and
the one cut off continues from its `last.ckpt` (`resume=true`).
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from ovcf.atomic import write_json
from ovcf.cli import CommandError, debug_choice, hydra_main, run_command, run_commands, side_by_side
from ovcf.errors import ConfigError
from ovcf.eval.leaderboard import announce, collect, rows
from ovcf.eval.report import versions
from ovcf.inference.system import export_system

log = logging.getLogger(__name__)

STAGES = ("segmentation", "masks", "classification", "evaluation", "system")
SETTINGS = ("seed", "overrides", "segmentation_overrides", "classification_overrides")  # with the model lists


def _listing(values) -> str:
    return ",".join(str(v) for v in values)


def commands(cfg: DictConfig, folder: Path, segmenter_ckpt: Path | None = None, debug: str | None = None) -> dict[str, list[str]]:
    """The argument lists of the stages that run as commands (a stage needing an earlier choice gets it
    here); `debug` is the debug/ option passed to the training and segment stages."""
    shared = [f"seed={cfg.seed}", *([f"debug={debug}"] if debug else []), *cfg.overrides]
    launcher = [f"hydra/launcher={cfg.launcher}", *cfg.launcher_overrides] if cfg.launcher else []
    masks = folder / "masks"
    # The classifiers are chosen by their mean validation AUROC over patient folds: one fold of a few
    # dozen vertebrae can crown a model by luck. A debug cohort is too small to fold.
    folds = [f"cv.folds={cfg.study.folds}"] if cfg.study.get("folds", 1) > 1 and not debug else []
    return {
        "segmentation": [
            "ovcf.train", "-m", "task=segmentation", f"model={_listing(cfg.study.segmenters)}", "resume=true",
            f"hydra.sweep.dir={folder / 'segmentation'}", *launcher, *shared, *cfg.segmentation_overrides,
        ],
        "masks": [
            "ovcf.segment", f"ckpt={segmenter_ckpt}", f"out={masks}", f"hydra.run.dir={masks}", *shared,
        ],
        "classification": [
            "ovcf.train", "-m", "task=classification", f"model={_listing(cfg.study.classifiers)}", "resume=true",
            "data.roi_source=predicted", f"data.predicted_masks={masks}", *folds,
            f"hydra.sweep.dir={folder / 'classification'}", *launcher, *shared, *cfg.classification_overrides,
        ],
        "evaluation": [
            "ovcf.evaluate", f"run={folder / 'classification'}", f"segmentation={folder / 'segmentation'}",
            f"out={folder / 'evaluation'}", f"hydra.run.dir={folder / 'evaluation'}",
            *(["threshold.rule=fixed"] if debug else []),  # a debug cohort's validation fold may hold one class
            *cfg.evaluate_overrides,
        ],
    }  # fmt: skip


SWEEPS = {"segmentation": ("segmenters", "val/dice"), "classification": ("classifiers", "val/auroc")}


def sweep_runs(argv: list[str], models: list[str], sweep: Path) -> dict[str, list[str]]:
    """A sweep's multirun command as one command per model, each in the folder Hydra's sweep gives it
    (`sweep/0`, `sweep/1`, ...), so either way of running leaves the same folder."""

    def run(i: int, model: str) -> list[str]:
        swap = {"model": f"model={model}", "hydra.sweep.dir": f"hydra.run.dir={sweep / str(i)}"}
        return [swap.get(a.split("=", 1)[0], a) for a in argv if a != "-m"]

    return {model: run(i, model) for i, model in enumerate(models)}


def run_sweep(cfg: DictConfig, stage: str, argv: list[str], folder: Path) -> None:
    """Runs a sweep stage: as one multirun command, or its runs side by side (`side_by_side`,
    `run_commands`), and then the sweep's leaderboard."""
    key, metric = SWEEPS[stage]
    models = list(cfg.study[key])
    jobs = side_by_side(cfg.jobs, len(models), cfg.launcher)
    if jobs == 1:
        run_command(argv, folder / f"{stage}.log")
        return
    run_commands(sweep_runs(argv, models, folder / stage), folder / f"{stage}.log", jobs)
    announce(folder / stage, metric)


def best_run(sweep: Path, metric: str) -> tuple[Path, dict]:
    """The run of a sweep folder with the best validation `metric`, and its results."""
    runs = collect(sweep)
    table = rows(runs, metric)
    if not table or not table[0]["best"]:
        raise CommandError(f"{sweep} holds no finished run with a validation {metric}: see the run logs there")
    results = next(r for r in runs if r["run"] == table[0]["run"])
    return sweep / results["run"], results


class Manifest:
    """`study.json`: what the study was asked to do, what each stage did, and what it chose."""

    def __init__(self, folder: Path, cfg: DictConfig):
        self.path = folder / "study.json"
        settings = OmegaConf.to_container(cfg.study, resolve=True) | {
            k: OmegaConf.to_container(cfg, resolve=True)[k] for k in SETTINGS
        }
        settings["debug"] = debug_choice()
        if self.path.is_file():
            self.data = json.loads(self.path.read_text())
            if self.data.get("settings") != settings:
                changed = sorted(k for k in settings if self.data.get("settings", {}).get(k) != settings[k])
                raise ConfigError(
                    f"{folder} holds a study run with other settings ({', '.join(changed)}): resume it with the same "
                    f"command, or start another with name=NEW"
                )
        else:
            self.data = {"settings": settings, "stages": {}, "chosen": {}}
        self.data["config"] = OmegaConf.to_container(cfg, resolve=True)

    def done(self, stage: str) -> bool:
        return self.data["stages"].get(stage, {}).get("status") == "done"

    def save(self) -> None:
        self.data["versions"] = versions()
        write_json(self.path, self.data, indent=2)


def study(cfg: DictConfig) -> Path:
    """Runs the stages that are not done yet; returns the study folder."""
    folder = Path(cfg.out).expanduser().resolve()
    folder.mkdir(parents=True, exist_ok=True)
    manifest = Manifest(folder, cfg)
    manifest.save()
    log.info(f"Study folder: {folder}")
    chosen = manifest.data["chosen"]
    if cfg.stop_after is not None and cfg.stop_after not in STAGES:
        raise ConfigError(f"stop_after={cfg.stop_after}: choose one of {', '.join(STAGES)}")
    stages = STAGES[: STAGES.index(cfg.stop_after) + 1] if cfg.stop_after else STAGES
    for stage in stages:
        if manifest.done(stage):
            log.info(f"[{stage}] done before, skipped")
            continue
        log.info(f"[{stage}] starting")
        start = time.time()
        segmenter = Path(chosen["segmenter"]["checkpoint"]) if "segmenter" in chosen else None
        if stage == "system":
            export_system(Path(chosen["classifier"]["run"]), segmenter, folder / "system", folder / "evaluation")
        elif stage in SWEEPS:
            run_sweep(cfg, stage, commands(cfg, folder, segmenter, debug_choice())[stage], folder)
        else:
            run_command(commands(cfg, folder, segmenter, debug_choice())[stage], folder / f"{stage}.log")
        if stage == "segmentation":
            run, results = best_run(folder / "segmentation", "val/dice")
            chosen["segmenter"] = {
                "model": results["model"],
                "run": str(run),
                "checkpoint": str(run / results["best_checkpoint"]),
                "val_dice": results["val"]["dice"],
            }
        elif stage == "classification":
            run, results = best_run(folder / "classification", "val/auroc")
            chosen["classifier"] = {"model": results["model"], "run": str(run), "val_auroc": results["val"]["auroc"]}
            chosen["data_hash"] = results.get("data_hash")
        elif stage == "evaluation":
            shutil.copy(folder / "evaluation" / "report.html", folder / "report.html")
            metrics = json.loads((folder / "evaluation" / "metrics.json").read_text())
            best = metrics["models"][metrics["best"]]  # evaluate chooses by validation AUROC too
            scored = best[metrics.get("scored", "test")]  # one center: the out-of-fold validation rows
            chosen["classifier"]["external" if metrics.get("external") else "internal"] = {
                "auc": scored["auc"]["value"],
                "threshold": best["threshold"]["value"],
                **{k: scored[k]["value"] for k in ("sensitivity", "specificity")},
            }
        manifest.data["stages"][stage] = {"status": "done", "seconds": round(time.time() - start, 1)}
        manifest.save()
        log.info(f"[{stage}] done in {time.time() - start:.0f} s")
    if len(stages) < len(STAGES):
        log.info(f"Stopped after {cfg.stop_after} (stop_after); the same command without it goes on")
        return folder
    seconds = sum(s["seconds"] for s in manifest.data["stages"].values())
    log.info(
        f"Chosen: segmenter {chosen['segmenter']['model']} (val Dice {chosen['segmenter']['val_dice']:.3f}), classifier "
        f"{chosen['classifier']['model']} (val AUROC {chosen['classifier']['val_auroc']:.3f}); {seconds / 60:.1f} min\n"
        f"Report: {folder / 'report.html'}\nSystem: {folder / 'system'} (python -m ovcf.predict input=DICOM_DIR output=OUT)"
    )
    return folder


main = hydra_main("study", study)

if __name__ == "__main__":
    main()
