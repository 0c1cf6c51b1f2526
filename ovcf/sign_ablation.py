"""`python -m ovcf.sign_ablation ckpt=RUN/checkpoints/epoch_NNN.ckpt`: which CT signs does a classifier read?

The external center of the synthetic cohort the model was trained on is rendered again with one
cue switched off at a time (each sign, and `collapse`: the same grade mix for both labels), every
other draw unchanged, and the model scores each version. The AUROC drop against the unablated
rendering says how much the model leans on that cue: a model that ignores the 1-2 mm bone signs
(fracture lines, condensation band, sclerotic rim) loses nothing when they go.

Writes `sign_ablation.csv` and `.md` into the output folder.
"""

from __future__ import annotations

import json
from pathlib import Path

from omegaconf import DictConfig

from ovcf.atomic import write_csv, write_text
from ovcf.cli import device, hydra_main
from ovcf.errors import ConfigError
from ovcf.eval.metrics import binary_scores
from ovcf.inference.models import load_classifier, score
from ovcf.inference.runs import cohort_dataset
from ovcf.synth.anatomy import ablation_cues
from ovcf.synth.cohort import generate_cohort, synthetic_folder


def ablate(cfg: DictConfig) -> Path:
    task, data = load_classifier(cfg.ckpt, device(cfg.device))
    if not data.get("synthetic"):
        raise ConfigError("sign ablation re-renders the synthetic cohort: pass a model trained on it (data.cohort=null)")
    synthetic = dict(data["synthetic"])
    centers = sorted(synthetic["centers"])
    center = cfg.center or data.get("external_center") or centers[1]
    if center not in centers:
        raise ConfigError(f"center={center} is not a center of the model's cohort ({', '.join(centers)})")
    cues = ablation_cues(synthetic["signs"])
    variants = list(cfg.signs) if cfg.signs else cues
    unknown = set(variants) - set(cues)
    if unknown:
        raise ConfigError(f"signs={sorted(unknown)}: choose from {', '.join(cues)}")
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)

    table, baseline, truth = [], None, []
    for variant in ["none", *variants]:
        params = synthetic | {"render_centers": [center], "plant": None, "ablate": [] if variant == "none" else [variant]}
        folder = synthetic_folder(Path(cfg.paths.data_dir), params)
        if not (folder / "synth.json").exists():
            print(f"Rendering center {center} without {variant}" if variant != "none" else f"Rendering center {center}")
            generate_cohort(folder, num_workers=cfg.workers, progress=cfg.progress, report=False, **params)
        # Scored on the rendered cohort's own masks, with the run's ingest checks, ROI and HU window.
        dataset, _ = cohort_dataset(data, folder, None, cfg.workers, cfg.progress)
        rows = dataset.rows
        auroc = binary_scores(dataset.labels.int(), score(task, dataset))["auroc"]
        if variant == "none":  # the reference: which fractures carry each sign when nothing is switched off
            baseline, truth = auroc, json.loads((folder / "synth.json").read_text())["patients"]
        with_cue = sum(variant in f["signs"] for p in truth for f in p["fractures"])
        table.append(
            {
                "switched_off": variant,
                "auroc": round(auroc, 4),
                "drop": round(baseline - auroc, 4),
                "rows": len(rows),
                "fractures_with_sign": "" if variant in ("none", "collapse") else with_cue,
            }
        )
        print(f"{variant:>22}: AUROC {auroc:.3f} (drop {baseline - auroc:+.3f}, {len(rows)} rows)")
    write_csv(out / "sign_ablation.csv", table, list(table[0]))
    lines = [
        f"# Sign ablation: {Path(cfg.ckpt).name}, center {center}",
        "",
        "Each line renders the center again with one cue switched off (collapse: the same grade mix for both labels).",
        "",
        "| switched off | AUROC | drop | rows | fractures with the sign |",
        "|---|---|---|---|---|",
        *(
            f"| {r['switched_off']} | {r['auroc']:.3f} | {r['drop']:+.3f} | {r['rows']} | {r['fractures_with_sign']} |"
            for r in table
        ),
    ]
    write_text(out / "sign_ablation.md", "\n".join(lines) + "\n")
    print(f"Sign ablation: {out / 'sign_ablation.md'}")
    return out


main = hydra_main("sign_ablation", ablate)

if __name__ == "__main__":
    main()
