"""`python -m ovcf.ingest cohort=DIR`: validate and cache a cohort, report its flow and splits.

`ovcf.train` runs the same ingest implicitly when the cache is stale; this command lets a study
team look at what their export yields (who is excluded and why) before training anything.
"""

from __future__ import annotations

import json
import logging

import hydra
from omegaconf import DictConfig

from ovcf.cli import check_data, hydra_main, resolve_cohort

log = logging.getLogger(__name__)


def ingest(cfg: DictConfig) -> dict:
    check_data(cfg)  # a wrong folder or center name, named before the data module loads torch
    resolve_cohort(cfg)  # without cohort=, the built-in synthetic cohort (generated once, as ovcf.train does)
    dm = hydra.utils.instantiate(cfg.data)  # the same DataModule config as ovcf.train: the same cache
    dm.prepare_data()
    flow = json.loads((dm.cache / "flow.json").read_text())
    t = flow["totals"]
    log.info(f"{t['received']} rows of {t['patients']} patients: {t['included']} included, {t['excluded']} excluded")
    for reason, n in t["excluded_by_reason"].items():
        log.info(f"  excluded, {reason}: {n}")
    for center, c in t["included_by_center"].items():
        log.info(f"  included, center {center}: {c['acute']} acute, {c['chronic']} chronic ({c['patients']} patients)")
    for flag, n in t.get("flagged", {}).items():
        log.info(f"  flagged, {flag}: {n}")
    splits = dm.make_splits()
    log.info(f"Flow report: {dm.cache / 'flow.md'} (also flow.json, flow.png)")
    test = f"test center {splits['external_center']}" if splits["external_center"] is not None else "no external center"
    log.info(f"Splits ({splits['n_folds']} folds of center {splits['dev_center']}; {test}): {dm.cache / 'splits.json'}")
    return flow


main = hydra_main("ingest", ingest)

if __name__ == "__main__":
    main()
