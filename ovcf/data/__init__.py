"""The cohort contract in code: DICOM series, HU volumes, masks, exclusions, splits, DataModules.

`CohortDataModule` is imported on first use, so that ingest worker processes, which need only
the readers, do not pay for importing Lightning and torch.
"""

__all__ = ["CohortDataModule"]


def __getattr__(name: str):
    if name == "CohortDataModule":
        from ovcf.data.datamodule import CohortDataModule

        return CohortDataModule
    raise AttributeError(f"module 'ovcf.data' has no attribute '{name}'")
