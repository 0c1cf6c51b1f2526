"""`python -m ovcf.transfer`: leave-one-style-out validation, our stand-in for another scanner or hospital.

The synthetic generator draws every patient in one of several rendering styles (body shape,
texture, anatomy, scanner, and how each sign is drawn). A model that learned the fracture rather
than the renderer keeps its AUROC on a style it never saw. For each style in turn, the chosen
recipe is trained (`python -m ovcf.train`, its own process, resumable) on a cohort drawn from the
other styles; its external center is then rendered again in the held-out style and scored, once
whole and once per sign switched off (the sign ablation). In-style AUROC is the run's own external
test (the training styles).

Writes `transfer.md` and `transfer.csv` (one line per held-out style) and `ablation.csv` (one line
per style and cue) into `logs/transfer/<name>`.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from omegaconf import DictConfig

from ovcf.ablation import ablation_table, check_variants, load_models
from ovcf.atomic import write_csv, write_text
from ovcf.cli import debug_choice, device, hydra_main, run_command, run_commands, side_by_side
from ovcf.errors import ConfigError

log = logging.getLogger(__name__)


def plan(cfg: DictConfig) -> list[tuple[list[str], list[str]]]:
    """(training styles, held-out styles) of each training run."""
    mix = list(cfg.synthetic.styles)  # every style the generator knows
    known = set(mix)
    asked = list(cfg.styles) if cfg.styles else mix
    for field, names in (("styles", asked), ("train_styles", list(cfg.train_styles or []))):
        unknown = [s for s in names if s not in known]
        if unknown:
            raise ConfigError(f"{field}={unknown}: the styles are {', '.join(sorted(known))}")
    if cfg.train_styles:
        held = [s for s in asked if s not in cfg.train_styles]
        if not held:
            raise ConfigError(f"train_styles={list(cfg.train_styles)} leaves no style of {asked} to score")
        return [(list(cfg.train_styles), held)]
    if len(mix) < 2:
        raise ConfigError(f"synthetic.styles holds {mix}: leave-one-style-out needs at least two styles")
    return [([s for s in mix if s != style], [style]) for style in asked]


def train_argv(cfg: DictConfig, styles: list[str], folder: Path) -> list[str]:
    """The `ovcf.train` command of the recipe on a cohort of `styles`, into `folder` (resumable)."""
    debug = debug_choice()
    return [
        "ovcf.train", f"synthetic.style_mix=[{','.join(styles)}]", f"hydra.run.dir={folder}", "resume=true",
        f"seed={cfg.seed}", *([f"debug={debug}"] if debug else []), *cfg.overrides,
    ]  # fmt: skip


def train_runs(cfg: DictConfig, out: Path, runs: list[tuple[list[str], list[str]]]) -> dict[str, Path]:
    """Trains every run (skipped when finished before): side by side on a CPU (`jobs`), as the study's
    sweeps; returns each run's folder by its name."""
    folders = {"_".join(styles): out / ("train_" + "_".join(styles)) for styles, _ in runs}
    argvs = {name: train_argv(cfg, styles, folders[name]) for name, (styles, _) in zip(folders, runs)}
    for folder in folders.values():
        folder.mkdir(parents=True, exist_ok=True)
    jobs = side_by_side(cfg.jobs, len(argvs))
    if jobs == 1:
        for name, argv in argvs.items():
            run_command(argv, folders[name] / "train.log")
    else:
        run_commands(argvs, out / "train.log", jobs)
    return folders


def transfer(cfg: DictConfig) -> Path:
    out = Path(cfg.out).expanduser().resolve()
    out.mkdir(parents=True, exist_ok=True)
    runs = plan(cfg)
    folders = train_runs(cfg, out, runs)
    summary, ablation = [], []
    for (train_styles, held_out), folder in zip(runs, folders.values()):
        results = json.loads((folder / "results.json").read_text())
        if results.get("test") is None:
            raise ConfigError("leave-one-style-out scores the runs' external center: train on a two-center synthetic cohort")
        tasks, data = load_models(folder, device(cfg.device))
        synthetic = dict(data["synthetic"])
        center = cfg.center or data.get("external_center") or sorted(synthetic["centers"])[1]
        variants = check_variants(synthetic, cfg.signs) if cfg.ablation else []
        for style in held_out:
            log.info(f"Held-out style {style}: model trained on {', '.join(train_styles)}")
            styled = synthetic | {"style_mix": [style]}
            table = ablation_table(tasks, data, styled, center, variants, Path(cfg.paths.data_dir), cfg.workers, cfg.progress)
            summary.append(
                {
                    "held_out": style,
                    "trained_on": "+".join(train_styles),
                    "model": results["model"],
                    "in_style_auroc": round(results["test"]["auroc"], 4),
                    "held_out_auroc": table[0]["auroc"],
                    "gap": round(results["test"]["auroc"] - table[0]["auroc"], 4),
                    "held_out_rows": table[0]["rows"],
                    "run": folder.name,
                }
            )
            ablation += [{"held_out": style, **row} for row in table[1:]]
    write_report(out, summary, ablation, center)
    return out


def write_report(out: Path, summary: list[dict], ablation: list[dict], center: str) -> None:
    write_csv(out / "transfer.csv", summary, list(summary[0]))
    lines = [
        "# Leave-one-style-out validation",
        "",
        f"Each model is scored on center {center} rendered in a style it never saw (held-out AUROC) and on its own",
        "external test in the styles it trained on (in-style AUROC).",
        "",
        "| held out | trained on | model | in-style AUROC | held-out AUROC | gap | rows |",
        "|---|---|---|---|---|---|---|",
        *(
            f"| {r['held_out']} | {r['trained_on']} | {r['model']} | {r['in_style_auroc']:.3f} | {r['held_out_auroc']:.3f} "
            f"| {r['gap']:+.3f} | {r['held_out_rows']} |"
            for r in summary
        ),
    ]
    if ablation:
        write_csv(out / "ablation.csv", ablation, list(ablation[0]))
        styles = list(dict.fromkeys(r["held_out"] for r in ablation))
        cues = list(dict.fromkeys(r["switched_off"] for r in ablation))
        drop = {(r["held_out"], r["switched_off"]): r["drop"] for r in ablation}
        lines += [
            "",
            "## Sign ablation per held-out style",
            "",
            "AUROC lost when one cue is switched off in the held-out rendering (every other draw the same).",
            "",
            "| switched off | " + " | ".join(styles) + " |",
            "|---|" + "---|" * len(styles),
            *(f"| {cue} | " + " | ".join(f"{drop[(s, cue)]:+.3f}" for s in styles) + " |" for cue in cues),
        ]
    write_text(out / "transfer.md", "\n".join(lines) + "\n")
    log.info("\n".join(lines))
    log.info(f"Leave-one-style-out: {out / 'transfer.md'}")


main = hydra_main("transfer", transfer)

if __name__ == "__main__":
    main()
