"""`python -m ovcf.pretrain model=densenet121`: pretrain a classifier's encoder and sign heads on the phantoms.

The synthetic cohort says which CT signs every fracture shows (its `signs` column), so a classifier
trained on it with sign heads learns features of the fracture itself. This runs `python -m
ovcf.train` with `conf/pretrain.yaml` (the train config with sign heads on and a longer schedule;
every train option works) in `<run folder>/train/`, then writes the best checkpoint's encoder and
sign heads as one safetensors file, with what it is in its header (model, model_kwargs, the sign
order, the ROI). `model.model_kwargs.weights=FILE` then starts a run on another cohort from it; a
cohort without sign labels still gets sign probabilities from the pretrained heads.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from omegaconf import DictConfig
from torch import nn

from ovcf.cli import hydra_main, job_overrides, resolve_cohort, run_command
from ovcf.contract import CLINICAL_CSV, SIGNS, SIGNS_COLUMN
from ovcf.data.clinical import has_signs
from ovcf.errors import ConfigError
from ovcf.inference.models import load_classifier
from ovcf.tasks.checkpoint import save_weights

log = logging.getLogger(__name__)

FORMAT = "ovcf-pretrain"
ROI_KEYS = ("roi_size", "roi_spacing", "roi_margin", "hu_window", "in_channels")
CARRIED = ("model", "data.roi", "data.in_channels", "data.hu_window")  # overrides the fine-tune run must repeat


def export_pretrained(ckpt: Path, out: Path) -> Path:
    """Writes the encoder (`net.*`) and sign heads (`sign_head.*`) of a classification checkpoint to `out`
    (safetensors; its header holds `format`, `model_name`, `model_kwargs`, `signs` and `roi` as JSON text)."""
    task, data = load_classifier(ckpt)
    if not task.hparams.get("sign_heads") or not bool(task.signs_learned):
        raise ConfigError(f"{ckpt} has no trained sign heads: train with model.sign_heads=true on a cohort with sign labels")
    metadata = {
        "format": FORMAT,
        "model_name": task.hparams.model_name,
        "model_kwargs": json.dumps(dict(task.hparams.model_kwargs)),
        "signs": json.dumps(list(SIGNS)),
        "roi": json.dumps({k: data.get(k) for k in ROI_KEYS}),
        "source": ckpt.name,
    }
    save_weights(nn.ModuleDict({"net": task.net, "sign_head": task.sign_head}), out, metadata)
    return out


def pretrain(cfg: DictConfig) -> Path:
    """Trains (a subprocess of `ovcf.train`, so the training run is exactly a train run) and exports; returns the file."""
    resolve_cohort(cfg)  # the synthetic cohort is generated here on first use; the train run reuses it
    if not has_signs(Path(cfg.data.cohort) / CLINICAL_CSV):
        raise ConfigError(
            f"{Path(cfg.data.cohort) / CLINICAL_CSV} has no {SIGNS_COLUMN} column: pretraining needs sign labels "
            "(the synthetic cohort has them; regenerate it if it predates them)"
        )
    run = Path(cfg.paths.output_dir)
    overrides = job_overrides()
    run.mkdir(parents=True, exist_ok=True)
    run_command(["ovcf.train", "--config-name", "pretrain", *overrides, f"hydra.run.dir={run / 'train'}"], run / "train.log")
    results = json.loads((run / "train" / "results.json").read_text())
    out = Path(cfg.pretrain.out).expanduser() if cfg.pretrain.out else run / f"{cfg.model.model_name}_signs.safetensors"
    export_pretrained(run / "train" / results["best_checkpoint"], out)
    log.info(f"Pretrained weights (encoder and sign heads): {out}")
    log.info(f"Fine-tune on your cohort: {finetune_command(cfg.model.model_name, overrides, out)}")
    return out


def finetune_command(model: str, overrides: list[str], weights: Path) -> str:
    """The train command line that starts from `weights`: the model and the pretraining's overrides that shape
    the network or its input (the encoder must be built the same)."""
    skip = ("model=", "model.sign", "model.model_kwargs.weights=")
    carried = [o for o in overrides if o.startswith(CARRIED) and not o.startswith(skip)]
    return " ".join(
        [
            "python -m ovcf.train",
            f"model={model}",
            *carried,
            f"model.model_kwargs.weights={weights}",
            "data.cohort=/path/to/cohort",
        ]
    )


main = hydra_main("pretrain", pretrain)

if __name__ == "__main__":
    main()
