"""The cohort contract in code: DICOM series, HU volumes, masks, exclusions, splits, DataModules."""

from ovcf.data.datamodule import CohortDataModule

__all__ = ["CohortDataModule"]
