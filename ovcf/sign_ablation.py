"""`python -m ovcf.sign_ablation ckpt=RUN/checkpoints/epoch_NNN.ckpt`: which CT signs does a classifier read?

The external center of the synthetic cohort the model was trained on is rendered again with one
cue switched off at a time (each sign, and `collapse`: the same grade mix for both labels), every
other draw unchanged, and the model scores each version. The AUROC drop against the unablated
rendering says how much the model leans on that cue: a model that ignores the 1-2 mm bone signs
(fracture lines, condensation band, sclerotic rim) loses nothing when they go.

Writes `sign_ablation.csv` and `.md` into the output folder.
"""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig

from ovcf.cli import check_overrides, config_dir, guarded
from ovcf.errors import ConfigError


def ablate(cfg: DictConfig) -> Path:
    from ovcf.data.datamodule import load_samples, synthetic_folder
    from ovcf.data.ingest import IngestChecks, RoiSpec, ingest, read_index
    from ovcf.eval.predictions import load_classifier, predict
    from ovcf.synth.anatomy import ablation_cues
    from ovcf.synth.cohort import generate_cohort
    from ovcf.tasks.classification import binary_metrics

    device = cfg.device if cfg.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    task, data = load_classifier(cfg.ckpt, device)
    if data.get("cohort") is not None or not data.get("synthetic"):
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
    roi = RoiSpec.from_settings(data)
    checks = IngestChecks.from_config(data.get("ingest"))
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)

    table, baseline, truth = [], None, []
    for variant in ["none", *variants]:
        params = synthetic | {"render_centers": [center], "plant": None, "ablate": [] if variant == "none" else [variant]}
        folder = synthetic_folder(Path(cfg.paths.data_dir), params)
        if not (folder / "synth.json").exists():
            print(f"Rendering center {center} without {variant}" if variant != "none" else f"Rendering center {center}")
            generate_cohort(folder, num_workers=cfg.workers, progress=cfg.progress, report=False, **params)
        cache = ingest(folder, cfg.paths.cache_dir, roi, cfg.paths.key_file, cfg.workers, cfg.progress, checks)
        rows = [r for r in read_index(cache) if r["included"]]
        dataset = load_samples(cache, rows, roi.size, data["hu_window"], mask_channel=data.get("in_channels", 1) == 2)
        metrics = binary_metrics()
        metrics.update(predict(task, dataset), dataset.labels.int())
        auroc = float(metrics.compute()["auroc"])
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
    with open(out / "sign_ablation.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(table[0]))
        writer.writeheader()
        writer.writerows(table)
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
    (out / "sign_ablation.md").write_text("\n".join(lines) + "\n")
    print(f"Sign ablation: {out / 'sign_ablation.md'}")
    return out


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="sign_ablation")
def main(cfg: DictConfig) -> None:
    guarded(ablate, cfg)


if __name__ == "__main__":
    check_overrides(sys.argv[1:])
    main()
