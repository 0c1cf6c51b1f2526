"""`python -m ovcf.sign_ablation ckpt=RUN/checkpoints/epoch_NNN.ckpt`: which CT signs does a classifier read?

`ckpt=RUN` (a `python -m ovcf.train` run folder, such as the study's chosen classifier) scores with
the run's test models: the fold ensemble of a `cv.folds` run, as its external test did.

The external center of the synthetic cohort the model was trained on is rendered again with one
cue switched off at a time (each sign, and `collapse`: the same grade mix for both labels), every
other draw unchanged, and the model scores each version. The AUROC drop against the unablated
rendering says how much the model leans on that cue: a model that ignores the 1-2 mm bone signs
(fracture lines, condensation band, sclerotic rim) loses nothing when they go.

Writes `sign_ablation.csv` and `.md` into the output folder.
"""

from __future__ import annotations

import logging
from pathlib import Path

from omegaconf import DictConfig

from ovcf.ablation import ablation_table, check_variants, load_models
from ovcf.atomic import write_csv, write_text
from ovcf.cli import device, hydra_main
from ovcf.errors import ConfigError

log = logging.getLogger(__name__)


def ablate(cfg: DictConfig) -> Path:
    source = Path(cfg.ckpt).expanduser()
    tasks, data = load_models(source, device(cfg.device))
    if not data.get("synthetic"):
        raise ConfigError("sign ablation re-renders the synthetic cohort: pass a model trained on it (data.cohort=null)")
    synthetic = dict(data["synthetic"])
    center = cfg.center or data.get("external_center") or sorted(synthetic["centers"])[1]
    variants = check_variants(synthetic, cfg.signs)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    table = ablation_table(tasks, data, synthetic, center, variants, Path(cfg.paths.data_dir), cfg.workers, cfg.progress)
    write_csv(out / "sign_ablation.csv", table, list(table[0]))
    lines = [
        f"# Sign ablation: {source.name} ({len(tasks)} model(s)), center {center}",
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
    log.info(f"Sign ablation: {out / 'sign_ablation.md'}")
    return out


main = hydra_main("sign_ablation", ablate)

if __name__ == "__main__":
    main()
