"""Whole-CT volumes of a cohort for segmentation: random patches to train, whole scans to validate and test.

Reuses `CohortDataModule` for everything that decides who is in which set (ingest, exclusions,
centers, patient folds in `splits.json`), so segmentation and classification always see the same
patients in the same roles; only the samples differ: each kept patient's CT at `volume_spacing`.
"""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from ovcf.contract import LEVEL_IDS
from ovcf.data.datamodule import CohortDataModule
from ovcf.data.instances import region_target
from ovcf.data.roi import window_hu
from ovcf.data.sampling import split_index
from ovcf.errors import ConfigError


class VolumeDataset(Dataset):
    """One item per patient: what a segmenter trains on and is scored against.

    Items: "image" (1, X, Y, Z) windowed CT; "label" (1, X, Y, Z) region classes with touching voxels left empty
    (`region_target`); "verse" (1, X, Y, Z) the true VerSe ids; "fractured" a bool per VerSe id, True for the levels
    the cohort names fractured; "spacing" (3,) mm; "id" the pseudonym.
    """

    def __init__(self, volumes: list[dict], hu_window):
        self.items = []
        for v in volumes:
            fractured = torch.zeros(max(LEVEL_IDS.values()) + 1, dtype=torch.bool)
            fractured[[LEVEL_IDS[level] for level in v["fractured"] if level in LEVEL_IDS]] = True
            labels = v["labels"].astype(np.int64)
            self.items.append(
                {
                    "image": torch.from_numpy(window_hu(v["image"], hu_window))[None],
                    "label": torch.from_numpy(region_target(labels))[None],
                    "verse": torch.from_numpy(labels)[None],
                    "fractured": fractured,
                    "spacing": torch.tensor(v["spacing"], dtype=torch.float64),
                    "id": v["name"],
                }
            )

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        return self.items[i]


class PatchDataset(Dataset):
    """`samples_per_volume` random patches per patient and epoch; `foreground` of them centred on a body.

    Forcing some patches onto vertebrae (as nnU-Net oversamples foreground) keeps small bodies from
    being drowned by background; the rest teach the network what is not a vertebra.
    """

    def __init__(self, volumes: VolumeDataset, patch_size, samples_per_volume: int, foreground: float, seed: int):
        self.volumes, self.patch = volumes, np.array(patch_size, int)
        self.samples, self.foreground, self.seed = samples_per_volume, foreground, seed
        self.bodies = [torch.nonzero(item["label"][0]).numpy() for item in volumes.items]

    def __len__(self) -> int:
        return len(self.volumes) * self.samples

    def __getitem__(self, item) -> dict:
        i, epoch = split_index(item)  # the EpochSampler's (index, epoch); a plain index is epoch 0
        v = i // self.samples
        rng = np.random.default_rng([self.seed, epoch or 0, i])
        image, labels = self.volumes.items[v]["image"], self.volumes.items[v]["label"]
        shape = np.array(image.shape[1:])
        bodies = self.bodies[v]
        if len(bodies) and rng.random() < self.foreground:
            centre = bodies[rng.integers(len(bodies))]
        else:
            centre = rng.integers(0, shape)
        start = np.clip(centre - self.patch // 2, 0, np.maximum(shape - self.patch, 0))
        sl = tuple(slice(int(s), int(s + p)) for s, p in zip(start, self.patch))
        img, lab = image[(slice(None), *sl)], labels[(slice(None), *sl)]
        pad = [(0, int(p - n)) for p, n in zip(self.patch, img.shape[1:])]  # scans smaller than a patch
        if any(after for _, after in pad):
            flat = [x for pair in reversed(pad) for x in pair]
            img = torch.nn.functional.pad(img, flat, value=0.0)
            lab = torch.nn.functional.pad(lab, flat, value=0)
        return {"image": img, "label": lab}


class SegmentationDataModule(CohortDataModule):
    """Patches of the development center's training folds; whole scans for validation and the external test.

    Args:
        patch_size: voxels per side of the training patches (at `roi`'s `volume_spacing`).
        samples_per_volume: patches drawn per training patient and epoch.
        foreground: share of patches centred on a vertebral body.
        **kwargs: as `CohortDataModule` (cohort, centers, folds, seed, HU window, ingest ...).
    """

    def __init__(self, patch_size=(64, 64, 64), samples_per_volume: int = 4, foreground: float = 0.67, **kwargs):
        super().__init__(**kwargs)
        self.batch_augment = None  # the classifier's ROI augmentation; patches are drawn, not augmented
        if self.roi.volume_spacing is None:
            raise ConfigError("segmentation needs data.volume_spacing (mm) so that ingest caches whole CT volumes")
        self.patch_size = [int(p) for p in patch_size]
        self.samples_per_volume, self.foreground = int(samples_per_volume), float(foreground)

    def setup(self, stage: str | None = None) -> None:
        if self.datasets:
            return
        volumes = {name: VolumeDataset(self._volumes(rows), self.hparams.hu_window) for name, rows in self.split_rows().items()}
        train = volumes.pop("train")
        self.datasets = {
            "train": PatchDataset(train, self.patch_size, self.samples_per_volume, self.foreground, self.hparams.seed),
            **volumes,  # val, and test unless the cohort has one center
        }

    def summary(self) -> str:
        """One line per split: scans (and training patches per epoch), for the log."""
        lines = []
        for name, ds in self.datasets.items():
            center = self.centers["external" if name == "test" else "dev"]
            scans = len(getattr(ds, "volumes", ds))
            extra = f", {len(ds)} patches of {self.patch_size} per epoch" if name == "train" else ""
            lines.append(f"{name:>5}: center {center}, {scans} scans{extra}")
        return "\n".join([*lines, *self.center_note()])

    def _volumes(self, rows: list[dict]) -> list[dict]:
        """Each patient's cached CT volume, labels and spacing, and the levels its rows name fractured."""
        fractured: dict[str, list[str]] = {}
        for r in rows:
            fractured.setdefault(r["pseudonym"], []).append(r["level"])
        out = []
        for name, levels in fractured.items():
            path = self.cache / "samples" / f"{name}.npz"
            with np.load(path) as npz:
                if "volume_image" not in npz:
                    raise ConfigError(f"{path} holds no whole-CT volume; delete {self.cache} so ingest caches it again")
                affine = npz["volume_affine"]
                spacing = np.linalg.norm(affine[:3, :3], axis=0)
                out.append(
                    {
                        "name": name,
                        "image": npz["volume_image"],
                        "labels": npz["volume_labels"],
                        "spacing": spacing,
                        "fractured": levels,
                    }
                )
        return out

    def _loader(self, name: str, shuffle: bool) -> DataLoader:
        if name == "train":
            return super()._loader(name, shuffle)
        return DataLoader(self.datasets[name], batch_size=1, num_workers=self.hparams.num_workers)
