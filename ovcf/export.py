"""`python -m ovcf.export classifier=RUN segmenter=CKPT out=DIR [evaluation=DIR]`: the chosen system as one folder.

A trained system is more than a checkpoint: the segmenter that finds the bodies, the classifier (or
the fold models of a cross-validation run, averaged), the operating threshold frozen on validation,
and the preprocessing the models were trained with. `ovcf.inference.system.export_system` writes all
of it into one versioned folder, laid out like a MONAI bundle, that `python -m ovcf.predict
system=DIR` loads with no Hydra run folder around it. With `evaluation=`, the threshold is the one
`python -m ovcf.evaluate` froze for this run; otherwise it is chosen as evaluate does.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from omegaconf import DictConfig

from ovcf.cli import device, hydra_main
from ovcf.errors import ConfigError
from ovcf.inference.system import METADATA, export_system

log = logging.getLogger(__name__)


def run(cfg: DictConfig) -> Path:
    if not cfg.classifier or not cfg.segmenter or not cfg.out:
        raise ConfigError(
            "pass classifier=RUN (a classification run folder), segmenter=CKPT (a segmentation checkpoint) and out=DIR"
        )
    out = export_system(
        Path(cfg.classifier),
        Path(cfg.segmenter),
        Path(cfg.out),
        Path(cfg.evaluation) if cfg.evaluation else None,
        rule=cfg.threshold.rule,
        sensitivity=cfg.threshold.sensitivity,
        version=str(cfg.version),
        device=device(cfg.device),
        progress=cfg.progress,
    )
    meta = json.loads((out / METADATA).read_text())
    log.info(f"System {meta['version']}: threshold {meta['threshold']:.4f} ({meta['threshold_rule']})")
    log.info(f"Exported: {out}")
    log.info(f"Use it: python -m ovcf.predict system={out} input=DICOM_DIR output=OUT_DIR")
    return out


main = hydra_main("export", run)

if __name__ == "__main__":
    main()
