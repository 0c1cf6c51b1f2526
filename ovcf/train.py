"""`python -m ovcf.train model=densenet121` or `task=segmentation model=unet`: fit on one center, test on the other.

Writes into the run folder: checkpoints (best by the optimized metric, and last), CSV (and W&B)
logs, `results.json` with the final validation and external-test metrics, and
`test_predictions.csv` (the run itself is `ovcf.training.train`). Returns the optimized metric for
Hydra sweepers. A cohort of one center has no external test: `results.json` then holds `"test":
null` and a `note` that its figures are internal validation (patient folds), and no
`test_predictions.csv` is written.

`hparams_search=<name>` (an Optuna search) is `python -m ovcf.tune`'s: this command hands the whole
command line over to it.
"""

from __future__ import annotations

import os
import sys

from omegaconf import DictConfig

from ovcf.cli import check_data, hydra_main


def train(cfg: DictConfig) -> float:
    """`ovcf.training.train`, defined here so that Hydra names the job (and its log file) `train`.

    Imported when a run starts, so that handing `hparams_search=` over to ovcf.tune loads no torch,
    and a wrong cohort folder or center name is named before torch loads."""
    check_data(cfg)
    from ovcf.training import train as run

    return run(cfg)


_main = hydra_main("train", train)


def forward_search(argv: list[str]) -> None:
    """`hparams_search=<name>` runs in `python -m ovcf.tune` (Optuna 4+, trials counted in the study):
    replaces this process by it, with the same arguments (`-m` dropped: a search is not a multirun)."""
    if not any(a.startswith("hparams_search=") and a.split("=", 1)[1] not in ("", "null") for a in argv):
        return
    args = [a for a in argv if a not in ("-m", "--multirun")]
    print(f"hparams_search= runs in python -m ovcf.tune now: python -m ovcf.tune {' '.join(args)}", file=sys.stderr, flush=True)
    os.execv(sys.executable, [sys.executable, "-m", "ovcf.tune", *args])


def main():
    forward_search(sys.argv[1:])
    return _main()


if __name__ == "__main__":
    main()
