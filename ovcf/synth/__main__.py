"""`python -m ovcf.synth out=DIR`: writes a synthetic two-center cohort in the cohort format."""

from __future__ import annotations

import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from ovcf.cli import check_overrides, config_dir, guarded
from ovcf.synth.cohort import difficulty_summary, generate_cohort


def synth(cfg: DictConfig) -> Path:
    params = OmegaConf.to_container(cfg, resolve=True)
    for key in ("out", "task_name", "paths", "num_workers", "report"):
        params.pop(key, None)
    out = generate_cohort(Path(cfg.out).expanduser(), num_workers=cfg.num_workers, report=cfg.report, **params)
    print(f"Synthetic cohort written to {out.resolve()}")
    if cfg.report:
        print(difficulty_summary(out))
    return out


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="synth")
def main(cfg: DictConfig) -> None:
    guarded(synth, cfg)


if __name__ == "__main__":
    check_overrides(sys.argv[1:])
    main()
