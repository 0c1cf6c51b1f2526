"""LightningModules, one per task; they take primitive init args so checkpoints load without Hydra."""

from ovcf.tasks.classification import ClassificationTask

__all__ = ["ClassificationTask"]
