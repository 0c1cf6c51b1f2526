"""Acute (positive) vs chronic classification of one fractured vertebra."""

from __future__ import annotations

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import WandbLogger
from torch import nn
from torchmetrics import MetricCollection

from ovcf.data.sampling import seed_epoch
from ovcf.errors import ConfigError
from ovcf.eval.metrics import binary_metrics
from ovcf.eval.wandb_media import case_media
from ovcf.models import create_model

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
    ):
        super().__init__()
        model_kwargs = plain(model_kwargs)  # checkpoints must hold only primitives
        if not (pos_weight is None or pos_weight == "auto" or isinstance(pos_weight, (int, float))):
            raise ConfigError(f"model.pos_weight={pos_weight!r}: use null, a number or auto")
        self.save_hyperparameters()
        self.net = create_model(model_name, task="classification", **model_kwargs)
        width = self.net.num_features + (N_CLINICAL if clinical else 0)
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(width, 1))
        # Not a buffer: checkpoints must load whatever pos_weight the run had.
        self.pos_weight = None if pos_weight in (None, "auto") else torch.tensor(float(pos_weight))
        self.val_metrics = binary_metrics("val/")
        self.test_metrics = binary_metrics("test/")
        self.test_predictions: list[dict] = []

    def forward(self, image: torch.Tensor, clinical: torch.Tensor | None = None) -> torch.Tensor:
        features = self.net(image)
        if self.hparams.clinical:
            if clinical is None:
                raise ValueError("this model fuses clinical features: pass clinical=(B, 3) age, sex, T-score")
            features = torch.cat([features, clinical.to(features.dtype)], dim=1)
        return self.head(features).reshape(-1)

    def logits(self, batch: dict) -> torch.Tensor:
        return self(batch["image"], batch.get("clinical"))

    def loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        weight = None if self.pos_weight is None else self.pos_weight.to(logits.device)
        return F.binary_cross_entropy_with_logits(logits.float(), labels, pos_weight=weight)

    def on_fit_start(self) -> None:
        if self.hparams.pos_weight == "auto":
            labels = self.trainer.datamodule.datasets["train"].labels
            acute = float(labels.sum())
            self.pos_weight = torch.tensor((len(labels) - acute) / max(acute, 1.0))

    def on_train_epoch_start(self) -> None:
        seed_epoch(self.current_epoch)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss = self.loss(self.logits(batch), batch["label"])
        self.log("train/loss", loss, on_step=False, on_epoch=True, prog_bar=True, batch_size=len(batch["label"]))
        return loss

    def _evaluate(self, batch: dict, stage: str, metrics: MetricCollection) -> torch.Tensor:
        logits = self.logits(batch)
        loss = self.loss(logits, batch["label"])
        probs = torch.sigmoid(logits.float())
        metrics.update(probs, batch["label"].int())
        self.log(f"{stage}/loss", loss, on_step=False, on_epoch=True, prog_bar=True, batch_size=len(probs))
        self.log_dict(metrics, on_step=False, on_epoch=True, prog_bar=stage == "val")
        return probs

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self._evaluate(batch, "val", self.val_metrics)

    def on_test_epoch_start(self) -> None:
        self.test_predictions = []

    def test_step(self, batch: dict, batch_idx: int) -> None:
        probs = self._evaluate(batch, "test", self.test_metrics)
        for i, p, y in zip(batch["id"], probs.tolist(), batch["label"].tolist()):
            self.test_predictions.append({"id": i, "label": int(y), "probability": p})

    def on_test_epoch_end(self) -> None:
        """W&B (when it logs): the external ROC, the confusion matrix at 0.5 and the per-case table."""
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
