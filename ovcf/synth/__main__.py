"""`python -m ovcf.synth out=DIR`: writes a synthetic two-center cohort in the cohort format."""

from __future__ import annotations

import logging
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from ovcf.cli import hydra_main
from ovcf.synth.cohort import difficulty_summary, generate_cohort

log = logging.getLogger(__name__)


def synth(cfg: DictConfig) -> Path:
    params = OmegaConf.to_container(cfg, resolve=True)
    for key in ("out", "task_name", "paths", "num_workers", "report"):
        params.pop(key, None)
    out = generate_cohort(Path(cfg.out).expanduser(), num_workers=cfg.num_workers, report=cfg.report, **params)
    log.info(f"Synthetic cohort written to {out.resolve()}")
    if cfg.report:
        log.info(difficulty_summary(out))
    return out


main = hydra_main("synth", synth)

if __name__ == "__main__":
    main()
