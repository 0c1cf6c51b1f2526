"""Acute (positive) vs chronic classification of one fractured vertebra."""

from __future__ import annotations

import lightning as L
import torch
from torch import nn
from torchmetrics import MetricCollection
from torchmetrics.classification import BinaryAccuracy, BinaryAUROC, BinaryRecall, BinarySpecificity

from ovcf.models import create_model


def plain(kwargs) -> dict:
    """A dict of primitives, also when Hydra passed a DictConfig."""
    if kwargs is None:
        return {}
    if isinstance(kwargs, dict):
        return dict(kwargs)
    from omegaconf import OmegaConf

    return OmegaConf.to_container(kwargs, resolve=True)


def _metrics(prefix: str) -> MetricCollection:
    return MetricCollection(
        {
            "auroc": BinaryAUROC(),
            "accuracy": BinaryAccuracy(),
            "sensitivity": BinaryRecall(),
            "specificity": BinarySpecificity(),
        },
        prefix=prefix,
    )


class ClassificationTask(L.LightningModule):
    """Trains a registry network with BCE on one logit per vertebra.

    Args:
        model_name: a name from `ovcf.models.list_models("classification")`.
        model_kwargs: keyword arguments of that network's factory.
        lr: AdamW learning rate (cosine-annealed over the run).
        weight_decay: AdamW weight decay.
        pos_weight: weight of the acute class in the loss (None: 1).
    """

    def __init__(
        self,
        model_name: str = "densenet121",
        model_kwargs: dict | None = None,
        lr: float = 1e-3,
        weight_decay: float = 1e-4,
        pos_weight: float | None = None,
    ):
        super().__init__()
        model_kwargs = plain(model_kwargs)  # checkpoints must hold only primitives
        self.save_hyperparameters()
        self.net = create_model(model_name, task="classification", **model_kwargs)
        weight = None if pos_weight is None else torch.tensor(float(pos_weight))
        self.loss = nn.BCEWithLogitsLoss(pos_weight=weight)
        self.val_metrics = _metrics("val/")
        self.test_metrics = _metrics("test/")
        self.test_predictions: list[dict] = []

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.net(image).reshape(-1)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss = self.loss(self(batch["image"]), batch["label"])
        self.log("train/loss", loss, on_step=False, on_epoch=True, prog_bar=True, batch_size=len(batch["label"]))
        return loss

    def _evaluate(self, batch: dict, stage: str, metrics: MetricCollection) -> torch.Tensor:
        logits = self(batch["image"])
        loss = self.loss(logits, batch["label"])
        probs = torch.sigmoid(logits)
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

    def predict_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        return torch.sigmoid(self(batch["image"]))

    def configure_optimizers(self):
        opt = torch.optim.AdamW(self.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)
        epochs = max(1, self.trainer.max_epochs or 1)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "epoch"}}
