"""`python -m ovcf.ingest cohort=DIR`: validate and cache a cohort, report its flow and splits.

`ovcf.train` runs the same ingest implicitly when the cache is stale; this command lets a study
team look at what their export yields (who is excluded and why) before training anything.
"""

from __future__ import annotations

import json
import sys

import hydra
from omegaconf import DictConfig, OmegaConf

from ovcf.cli import check_overrides, config_dir, guarded
from ovcf.data import CohortDataModule


def ingest(cfg: DictConfig) -> dict:
    dm = CohortDataModule(
        cohort=cfg.cohort,
        synthetic=OmegaConf.to_container(cfg.synthetic, resolve=True),
        data_dir=cfg.paths.data_dir,
        cache_dir=cfg.paths.cache_dir,
        key_file=cfg.paths.key_file,
        dev_center=cfg.dev_center,
        external_center=cfg.external_center,
        val_fraction=cfg.val_fraction,
        seed=cfg.seed,
        roi_size=cfg.roi_size,
        roi_spacing=cfg.roi_spacing,
        ingest=OmegaConf.to_container(cfg.ingest, resolve=True),
        ingest_workers=cfg.workers,
        progress=cfg.progress,
    )
    dm.prepare_data()
    flow = json.loads((dm.cache / "flow.json").read_text())
    t = flow["totals"]
    print(f"{t['received']} rows of {t['patients']} patients: {t['included']} included, {t['excluded']} excluded")
    for reason, n in t["excluded_by_reason"].items():
        print(f"  excluded, {reason}: {n}")
    for center, c in t["included_by_center"].items():
        print(f"  included, center {center}: {c['acute']} acute, {c['chronic']} chronic ({c['patients']} patients)")
    for flag, n in t.get("flagged", {}).items():
        print(f"  flagged, {flag}: {n}")
    splits = dm.make_splits()
    print(f"Flow report: {dm.cache / 'flow.md'} (also flow.json, flow.png)")
    print(
        f"Splits ({splits['n_folds']} folds of center {splits['dev_center']}, test center {splits['external_center']}): "
        f"{dm.cache / 'splits.json'}"
    )
    return flow


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="ingest")
def main(cfg: DictConfig) -> None:
    guarded(ingest, cfg)


if __name__ == "__main__":
    check_overrides(sys.argv[1:])
    main()
