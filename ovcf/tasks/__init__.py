"""LightningModules, one per task; they take primitive init args so checkpoints load without Hydra."""

from ovcf.tasks.classification import ClassificationTask
from ovcf.tasks.segmentation import SegmentationTask

__all__ = ["ClassificationTask", "SegmentationTask"]
