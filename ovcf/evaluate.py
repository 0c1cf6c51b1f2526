"""`python -m ovcf.evaluate run=DIR`: external validation of a classification run or a sweep.

Writes into `<run>/evaluation/` (or `out=`): `predictions.csv` (pseudonym, level, set, label,
probability, fold), `metrics.json` and `metrics.md` (AUC with DeLong CI; sensitivity, specificity,
accuracy, PPV, NPV with Wilson or patient-bootstrap CIs at the threshold frozen on validation;
paired DeLong tests; calibration), `roc.png`, `confusion_<model>.png`, `calibration.png`, the
cohort flow diagram, a Grad-CAM gallery per model (`gradcam/<model>/gradcam_TP.png` ...), and an
offline W&B run holding the same (`wandb sync` it). `cohort=DIR` scores another cohort instead of
the run's external center.
`sample_size=true` prints the Buderer sample size instead.
"""

from __future__ import annotations

import json
import logging

from omegaconf import DictConfig

from ovcf.cli import device, hydra_main
from ovcf.errors import ConfigError
from ovcf.eval.external import Scoring
from ovcf.eval.metrics import buderer_sample_size
from ovcf.inference.validation import evaluate

log = logging.getLogger(__name__)


def sample_size(cfg: DictConfig) -> dict:
    try:
        n = buderer_sample_size(cfg.sensitivity, cfg.specificity, cfg.error, cfg.alpha, cfg.prevalence)
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc
    i = n["inputs"]
    log.info(
        f"Buderer (1996): sensitivity {i['sensitivity']} and specificity {i['specificity']} to +-{i['error']} "
        f"at {100 * (1 - i['alpha']):g}% confidence, prevalence {i['prevalence']}:\n"
        f"  {n['acute']} acute + {n['chronic']} chronic, {n['total']} fractures in all "
        f"(exact {n['exact']['acute']:.1f} + {n['exact']['chronic']:.1f}; rounded up {n['conservative']['total']})"
    )
    return n


def run(cfg: DictConfig):
    if cfg.sample_size:
        return sample_size(cfg)
    if not cfg.run:
        raise ConfigError("pass run=DIR: a python -m ovcf.train classification run folder, or a sweep folder")
    out = evaluate(
        cfg.run,
        cfg.out,
        cfg.cohort,
        cfg.predicted_masks,
        Scoring(cfg.threshold.rule, cfg.threshold.sensitivity, cfg.ci, cfg.n_boot, cfg.seed, cfg.alpha),
        device(cfg.device),
        cfg.batch_size,
        cfg.workers,
        cfg.progress,
        planned={"sensitivity": cfg.sensitivity, "specificity": cfg.specificity, "error": cfg.error, "alpha": cfg.alpha},
        gradcam_cases=cfg.gradcam_cases,
        wandb_mode=cfg.wandb,
        segmentation=cfg.segmentation,
    )
    log.info((out / "metrics.md").read_text())
    log.info(f"Report: {out / 'report.html'}")
    log.info(f"Evaluation: {out} (metrics.json, predictions.csv, roc.png, confusion_*.png, calibration.png, gradcam/)")
    return json.loads((out / "metrics.json").read_text())


main = hydra_main("evaluate", run)

if __name__ == "__main__":
    main()
