"""Acute (positive) vs chronic classification of one fractured vertebra, with optional sign heads.

The sign heads (`sign_heads=true`) predict each CT sign of `ovcf.contract.SIGNS` from the image
features: an auxiliary task that makes the encoder look at the fracture's own signs rather than
whatever else tells the labels apart in one cohort (a scanner, a phantom maker's style). Rows
without sign labels (a cohort without the `signs` column) add nothing to their loss, so the same
config trains on any cohort; heads pretrained on the phantoms (`python -m ovcf.pretrain`) load with
the encoder from `model_kwargs.weights`, so a cohort without sign labels still gets sign probabilities.
"""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import WandbLogger
from torch import nn
from torchmetrics import MeanMetric, MetricCollection
from torchmetrics.functional.classification import binary_auroc

from ovcf.contract import SIGNS
from ovcf.data.sampling import seed_epoch
from ovcf.errors import ConfigError
from ovcf.eval.metrics import binary_metrics
from ovcf.eval.wandb_media import case_media
from ovcf.models import create_model
from ovcf.models.classifiers import read_weights

SIGN_HEAD = "sign_head."  # the sign head's tensors in a state dict and in a pretrain file

N_CLINICAL = 3  # age, sex, DXA T-score (ovcf.data.datamodule.clinical_features)


def plain(kwargs) -> dict:
    """A dict of primitives, also when Hydra passed a DictConfig."""
    if kwargs is None:
        return {}
    if isinstance(kwargs, dict):
        return dict(kwargs)
    from omegaconf import OmegaConf

    return OmegaConf.to_container(kwargs, resolve=True)


class ClassificationTask(L.LightningModule):
    """An image encoder from the registry, optionally fused with clinical features, then one logit per vertebra (BCE).

    Args:
        model_name: a name from `ovcf.models.list_models("classification")`.
        model_kwargs: keyword arguments of that network's factory.
        clinical: concatenate normalised age, sex and DXA T-score to the image features before the head.
        dropout: dropout before the head.
        lr: AdamW learning rate (cosine-annealed over the run).
        weight_decay: AdamW weight decay.
        pos_weight: weight of the acute class in the loss: None (1), a number, or "auto"
            (chronic / acute count of the training set, for imbalanced cohorts).
        sign_heads: add a linear head with one logit per sign of `SIGNS` on the image features
            (before clinical fusion), trained by BCE on the rows whose signs are known.
        sign_weight: weight of the mean sign BCE next to the acute BCE.
    """

    def __init__(
        self,
        model_name: str = "densenet121",
        model_kwargs: dict | None = None,
        clinical: bool = False,
        dropout: float = 0.0,
        lr: float = 1e-3,
        weight_decay: float = 1e-4,
        pos_weight: float | str | None = None,
        sign_heads: bool = False,
        sign_weight: float = 0.5,
    ):
        super().__init__()
        model_kwargs = plain(model_kwargs)  # checkpoints must hold only primitives
        if not (pos_weight is None or pos_weight == "auto" or isinstance(pos_weight, (int, float))):
            raise ConfigError(f"model.pos_weight={pos_weight!r}: use null, a number or auto")
        if not isinstance(sign_weight, (int, float)) or sign_weight < 0:
            raise ConfigError(f"model.sign_weight={sign_weight!r}: use a number >= 0 (the sign loss's weight)")
        self.save_hyperparameters()
        self.net = create_model(model_name, task="classification", **model_kwargs)
        width = self.net.num_features + (N_CLINICAL if clinical else 0)
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(width, 1))
        if sign_heads:
            self.sign_head = nn.Linear(self.net.num_features, len(SIGNS))
            # Whether the heads ever saw a sign label (here or in a pretrain file): untrained heads report nothing.
            self.register_buffer("signs_learned", torch.tensor(False))
            if model_kwargs.get("weights"):
                self._load_sign_head(Path(model_kwargs["weights"]).expanduser())
        self._sign_outputs: list[tuple[torch.Tensor, torch.Tensor]] = []
        # The epoch's sign loss, weighted by known rows on the device: logging it costs no host sync per step.
        self.train_sign_loss = MeanMetric(nan_strategy="disable")
        self._train_signs = True  # whether the training rows carry sign labels (on_fit_start)
        # Not a buffer: checkpoints must load whatever pos_weight the run had.
        self.pos_weight = None if pos_weight in (None, "auto") else torch.tensor(float(pos_weight))
        self.val_metrics = binary_metrics("val/")
        self.test_metrics = binary_metrics("test/")
        self.test_predictions: list[dict] = []

    def _load_sign_head(self, path: Path) -> None:
        """The sign head of a pretrain file (the encoder came through `model_kwargs.weights` already); a file
        without one (a foreign checkpoint) leaves the head to train."""
        state, meta = read_weights(path)
        if f"{SIGN_HEAD}weight" not in state:
            return
        signs = json.loads(meta.get("signs", "null")) or list(SIGNS)
        if list(signs) != list(SIGNS):
            raise ConfigError(f"weight file {path} has sign heads for {signs}, not this ovcf's {list(SIGNS)}: pretrain again")
        head = {k.removeprefix(SIGN_HEAD): v for k, v in state.items() if k.startswith(SIGN_HEAD)}
        try:
            self.sign_head.load_state_dict(head)
        except RuntimeError:
            raise ConfigError(f"weight file {path}: its sign head does not fit this encoder's features; pretrain again") from None
        self.signs_learned.fill_(True)

    def _fuse(self, features: torch.Tensor, clinical: torch.Tensor | None) -> torch.Tensor:
        if self.hparams.clinical:
            if clinical is None:
                raise ValueError("this model fuses clinical features: pass clinical=(B, 3) age, sex, T-score")
            features = torch.cat([features, clinical.to(features.dtype)], dim=1)
        return self.head(features).reshape(-1)

    def forward(self, image: torch.Tensor, clinical: torch.Tensor | None = None) -> torch.Tensor:
        return self._fuse(self.net(image), clinical)

    def reads(self, size: int) -> tuple[int, int] | None:
        """The X rows (lo, hi) of a cube `size` wide that the encoder reads, None for all of them:
        the DataModule's batched augmentation then makes only these."""
        reads = getattr(self.net, "reads", None)
        return None if reads is None else reads(size)

    def logits(self, batch: dict) -> torch.Tensor:
        return self(batch["image"], batch.get("clinical"))

    def outputs(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Acute logits (B,) and sign logits (B, len(SIGNS)) (None without sign heads) from one encoder pass."""
        features = self.net(batch["image"])
        signs = self.sign_head(features) if self.hparams.get("sign_heads") else None
        return self._fuse(features, batch.get("clinical")), signs

    @torch.no_grad()
    def sign_probabilities(self, image: torch.Tensor) -> torch.Tensor | None:
        """Probability of each sign of `SIGNS` per ROI, (B, len(SIGNS)); None when the model has no sign
        heads or they never saw a sign label (no pretrain file, no `signs` column)."""
        if not self.hparams.get("sign_heads") or not bool(self.signs_learned):
            return None
        return torch.sigmoid(self.sign_head(self.net(image)).float())

    def sign_loss(self, logits: torch.Tensor, signs: torch.Tensor, known: torch.Tensor) -> torch.Tensor:
        """Mean BCE over the signs of the rows whose signs are known, in the global batch.

        Under DDP each rank may hold a different number of labelled rows, so a per-rank mean would
        weigh rows unequally: each rank divides its sum by the count over all ranks (times the world
        size, which DDP's gradient averaging divides out again). 0, still on the graph, when no row is known.
        """
        per_row = F.binary_cross_entropy_with_logits(logits.float(), signs.float(), reduction="none").mean(1)
        total = (per_row * known.to(per_row.dtype)).sum()
        count = known.sum().to(per_row.dtype)
        trainer = self._trainer
        world = trainer.world_size if trainer is not None else 1
        if world > 1:
            count = trainer.strategy.reduce(count.detach(), reduce_op="sum")
        return total * world / count.clamp(min=1.0)

    def loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        weight = None if self.pos_weight is None else self.pos_weight.to(logits.device)
        return F.binary_cross_entropy_with_logits(logits.float(), labels, pos_weight=weight)

    def on_fit_start(self) -> None:
        train = getattr(self.trainer.datamodule, "datasets", {}).get("train")
        if self.hparams.pos_weight == "auto":
            labels = train.labels
            acute = float(labels.sum())
            self.pos_weight = torch.tensor((len(labels) - acute) / max(acute, 1.0))
        # A cohort without sign labels logs no sign loss; without a datamodule the rows are not known up front.
        self._train_signs = train is None or bool(train.signs_known.any())

    def on_train_epoch_start(self) -> None:
        seed_epoch(self.current_epoch)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        logits, sign_logits = self.outputs(batch)
        loss = self.loss(logits, batch["label"])
        if sign_logits is not None and "signs" in batch:
            known = batch["signs_known"]
            sign_loss = self.sign_loss(sign_logits, batch["signs"], known)
            loss = loss + self.hparams.sign_weight * sign_loss
            if self._train_signs:  # no host sync in the step: the flag and the weighted mean stay on the device
                self.signs_learned.logical_or_(known.any())
                self.train_sign_loss.update(sign_loss.detach(), weight=known.sum())
                self.log("train/sign_loss", self.train_sign_loss, on_step=False, on_epoch=True)
        self.log("train/loss", loss, on_step=False, on_epoch=True, prog_bar=True, batch_size=len(batch["label"]))
        return loss

    def _evaluate(self, batch: dict, stage: str, metrics: MetricCollection) -> tuple[torch.Tensor, torch.Tensor | None]:
        logits, sign_logits = self.outputs(batch)
        loss = self.loss(logits, batch["label"])
        probs = torch.sigmoid(logits.float())
        metrics.update(probs, batch["label"].int())
        self.log(f"{stage}/loss", loss, on_step=False, on_epoch=True, prog_bar=True, batch_size=len(probs))
        self.log_dict(metrics, on_step=False, on_epoch=True, prog_bar=stage == "val")
        sign_probs = None if sign_logits is None else torch.sigmoid(sign_logits.float())
        if sign_probs is not None and "signs" in batch and bool(batch["signs_known"].any()):
            known = batch["signs_known"]
            self._sign_outputs.append((sign_probs[known].detach().cpu(), batch["signs"][known].cpu()))
        return probs, sign_probs

    def _log_sign_auroc(self, stage: str) -> None:
        """`<stage>/sign_auroc`: the mean AUROC over the signs that show both classes among the known rows."""
        outputs, self._sign_outputs = self._sign_outputs, []
        auroc = sign_auroc(torch.cat([p for p, _ in outputs]), torch.cat([y for _, y in outputs])) if outputs else None
        if auroc is not None:
            self.log(f"{stage}/sign_auroc", auroc)

    def on_validation_epoch_start(self) -> None:
        self._sign_outputs = []

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self._evaluate(batch, "val", self.val_metrics)

    def on_validation_epoch_end(self) -> None:
        self._log_sign_auroc("val")

    def on_test_epoch_start(self) -> None:
        self.test_predictions, self._sign_outputs = [], []

    def test_step(self, batch: dict, batch_idx: int) -> None:
        probs, sign_probs = self._evaluate(batch, "test", self.test_metrics)
        report_signs = sign_probs is not None and bool(self.signs_learned)
        for k, (i, p, y) in enumerate(zip(batch["id"], probs.tolist(), batch["label"].tolist())):
            row = {"id": i, "label": int(y), "probability": p}
            if report_signs:
                row |= {f"p_{name}": v for name, v in zip(SIGNS, sign_probs[k].tolist())}
            self.test_predictions.append(row)

    def on_test_epoch_end(self) -> None:
        """`test/sign_auroc` (when signs are known); W&B (when it logs): the external ROC, the confusion
        matrix at 0.5 and the per-case table."""
        self._log_sign_auroc("test")
        loggers = [lg for lg in (self.loggers or []) if isinstance(lg, WandbLogger)]
        if not loggers or not self.test_predictions:
            return
        rows = self.test_predictions
        media = case_media("test", [r["id"] for r in rows], [r["label"] for r in rows], [r["probability"] for r in rows], 0.5)
        for lg in loggers:
            lg.experiment.log(media)

    def predict_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        return torch.sigmoid(self.logits(batch).float())

    def configure_optimizers(self):
        opt = torch.optim.AdamW(self.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)
        epochs = max(1, self.trainer.max_epochs or 1)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "epoch"}}


def sign_auroc(probs: torch.Tensor, labels: torch.Tensor) -> float | None:
    """Mean AUROC over the signs (columns) whose labels hold both classes; None when none does."""
    scores = [
        float(binary_auroc(probs[:, j], labels[:, j].int()))
        for j in range(labels.shape[1])
        if 0 < float(labels[:, j].sum()) < len(labels)
    ]
    return sum(scores) / len(scores) if scores else None
