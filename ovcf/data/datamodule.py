"""LightningDataModule over one cohort: development center -> train/val, the other -> test.

The external center is read only for `test` (and `predict`); it never enters training or model
selection. A cohort of one center has patient folds and no test set (internal validation only).
The data module takes a cohort folder; the entry points generate the built-in synthetic cohort
when none is given (`ovcf.cli.resolve_cohort`), so reading data never starts the generator.
"""

from __future__ import annotations

import logging
from pathlib import Path

import lightning as L
import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader, Dataset

from ovcf.contract import LABELS, SIGNS
from ovcf.data.augment import build_augment, scale_augment
from ovcf.data.batch_augment import BATCHED, BatchAugment
from ovcf.data.ct import IngestChecks
from ovcf.data.ingest import check_centers, ingest, read_index
from ovcf.data.roi import RoiSpec, window_hu
from ovcf.data.sampling import EpochSampler, sample_seed, split_index, world
from ovcf.data.splits import cohort_splits, one_center_note, write_splits
from ovcf.errors import ConfigError

log = logging.getLogger(__name__)


class VertebraDataset(Dataset):
    """In-memory ROIs of fractured vertebrae with their label, clinical features and sign labels.

    `signs` is one 0/1 per name of `SIGNS`; `signs_known` is False for a row without sign labels
    (`row["signs"]` None or absent: a cohort without the `signs` column), whose `signs` are zeros
    that the sign loss must skip.
    """

    def __init__(
        self,
        rows: list[dict],
        images: np.ndarray,
        masks: np.ndarray,
        hu_window,
        transform=None,
        mask_channel: bool = False,
        seed: int = 0,
    ):
        self.rows, self.transform, self.mask_channel, self.seed = rows, transform, mask_channel, int(seed)
        self.images = torch.from_numpy(window_hu(images, hu_window)).unsqueeze(1)
        self.masks = torch.from_numpy(masks).unsqueeze(1)
        self.labels = torch.tensor([LABELS.index(r["label"]) for r in rows], dtype=torch.float32)
        self.clinical = torch.tensor([clinical_features(r) for r in rows], dtype=torch.float32).reshape(len(rows), 3)
        self.signs_known = torch.tensor([r.get("signs") is not None for r in rows], dtype=torch.bool)
        self.signs = torch.tensor(
            [[float(name in (r.get("signs") or ())) for name in SIGNS] for r in rows], dtype=torch.float32
        ).reshape(len(rows), len(SIGNS))

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, item) -> dict:
        i, epoch = split_index(item)
        r = self.rows[i]
        image, mask = self.images[i], self.masks[i]
        if self.transform is not None:
            import torchio as tio

            # Clones: a view would drag the whole dataset's storage through torchio's copies.
            subject = tio.Subject(image=tio.ScalarImage(tensor=image.clone()), mask=tio.LabelMap(tensor=mask.clone()))
            if epoch is None:
                subject = self.transform(subject)
            else:  # the EpochSampler's key: this sample's augmentation depends on nothing else
                with torch.random.fork_rng(devices=[]):
                    torch.manual_seed(sample_seed(self.seed, epoch, i))
                    subject = self.transform(subject)
            image, mask = subject["image"].data.float(), subject["mask"].data
        if self.mask_channel:
            image = torch.cat([image, mask.to(image.dtype)])
        return {
            "image": image,
            "mask": mask,
            "label": self.labels[i],
            "clinical": self.clinical[i],
            "signs": self.signs[i],
            "signs_known": self.signs_known[i],
            "id": f"{r['pseudonym']}:{r['level']}",
            "index": i,  # with the epoch, the key of this sample's batched augmentation
            "epoch": -1 if epoch is None else epoch,
        }


def load_samples(
    cache: Path, rows: list[dict], roi_size: int, hu_window, transform=None, mask_channel: bool = False, seed: int = 0
) -> VertebraDataset:
    """The cached ROI and body mask of each index row (`samples/<pseudonym>.npz`), as a dataset."""
    images, masks, arrays = [], [], {}
    for r in rows:
        p = r["pseudonym"]
        if p not in arrays:
            arrays[p] = np.load(Path(cache) / "samples" / f"{p}.npz")
        images.append(arrays[p][f"r{r['row']}_image"])
        masks.append(arrays[p][f"r{r['row']}_mask"])
    shape = (0, *(roi_size,) * 3)
    return VertebraDataset(
        rows,
        np.stack(images).astype(np.float32) if images else np.zeros(shape, np.float32),
        np.stack(masks) if masks else np.zeros(shape, np.uint8),
        hu_window,
        transform,
        mask_channel,
        seed,
    )


def clinical_features(row: dict) -> list[float]:
    """Age, sex and T-score scaled to about unit range; a missing T-score reads as typical (-2.5)."""
    t = row["dxa_t_score"]
    t = -2.5 if np.isnan(t) else t
    age = 70.0 if np.isnan(row["age"]) else row["age"]
    return [(age - 70.0) / 10.0, 1.0 if row["sex"] == "F" else -1.0, (t + 2.5) / 1.5]


def predicted_mask_warnings(index: list[dict]) -> list[str]:
    """One line per patient whose named fractured level the predicted mask lacks (or who has no predicted mask)."""
    missing: dict[str, list[str]] = {}
    for r in index:
        if "level_mask_missing" in r["flags"] or "no_mask" in r["reasons"]:
            missing.setdefault(r["pseudonym"], []).append(r["level"])
    return [
        f"{name}: predicted mask lacks {', '.join(levels)}; the ROI is centred on the level's estimated position "
        "(or the patient is excluded as no_mask)"
        for name, levels in missing.items()
    ]


class CohortDataModule(L.LightningDataModule):
    """Vertebra samples of a cohort in the cohort format, split by patient.

    Args:
        cohort: folder with clinical.csv, dicom/ and optional masks/.
        roi_size: voxels per side of the cube cropped around each fractured body.
        roi_spacing: its isotropic spacing in mm.
        hu_window: HU range mapped to [0, 1].
        synthetic: the generator parameters when `cohort` is the built-in synthetic cohort (set by
            the entry point; kept in checkpoints so the sign ablation can render it again), else None.
        cache_dir: where preprocessed, pseudonymised samples are kept.
        key_file: pseudonym key file (see `ovcf.data.pseudonym`; None: the user's config folder).
        dev_center: center used for train/val; None takes the first center name in sorted order.
        external_center: center used only for test; None takes the second, or none when the cohort
            has one center (then there is no test set: internal validation only).
        val_fraction: share of development patients held out for validation: the development
            center is cut into round(1 / val_fraction) patient folds (written to `splits.json`).
        fold: which of those folds validates (the others train); None: every development patient
            trains and there is no validation set (a refit, `cv.test=refit`).
        seed: split seed.
        roi_margin: mm around each body's largest extent instead: the cube then spans extent + 2
            margins and its spacing follows the body (None: the fixed `roi_spacing`).
        volume_spacing: isotropic spacing (mm) of the whole-CT volumes cached for segmentation; None: none.
        roi_source: "given" cuts ROIs from the cohort's masks; "predicted" from `predicted_masks`.
        predicted_masks: the folder `python -m ovcf.segment` wrote (`<pseudonym>.nii.gz` per patient).
        in_channels: 1 feeds the CT; 2 adds the body mask as a second channel (the model configs
            read their `in_channels` from here).
        sampler: "balanced" draws training samples with weights that equalise acute and chronic;
            None shuffles (class imbalance can also be handled by `model.pos_weight=auto`).
        augment: transforms for training samples, `{TransformName: kwargs}`.
        augment_engine: "batch" runs them on each training batch on the training device
            (`ovcf.data.batch_augment`, which knows the default pipeline's transforms), "torchio" per
            sample in the loader (any torchio transform), "auto" the first when it knows them all.
        augment_strength: factor on their magnitudes (0: no augmentation; see `scale_augment`), one
            number for a hyper-parameter search.
        ingest: series validation and exclusion thresholds (see `conf/ingest/default.yaml`).
        num_workers: loader processes (0: the main process); they persist across epochs.
        prefetch: batches each worker keeps ready (with `num_workers` > 0).
    """

    def __init__(
        self,
        cohort: str | None,
        roi_size: int,
        roi_spacing: float,
        hu_window: tuple[float, float],
        synthetic: dict | None = None,
        cache_dir: str = ".cache/ovcf",
        key_file: str | None = None,
        dev_center: str | None = None,
        external_center: str | None = None,
        val_fraction: float = 0.2,
        fold: int | None = 0,
        seed: int = 0,
        roi_margin: float | None = None,
        volume_spacing: float | None = None,
        roi_source: str = "given",
        predicted_masks: str | None = None,
        in_channels: int = 1,
        sampler: str | None = None,
        augment: dict | None = None,
        augment_strength: float = 1.0,
        augment_engine: str = "auto",
        ingest: dict | None = None,
        batch_size: int = 16,
        num_workers: int = 0,
        prefetch: int = 2,
        ingest_workers: int = 2,
        progress: bool = True,
    ):
        super().__init__()
        if isinstance(synthetic, DictConfig):
            synthetic = OmegaConf.to_container(synthetic, resolve=True)
        if isinstance(ingest, DictConfig):
            ingest = OmegaConf.to_container(ingest, resolve=True)
        self.save_hyperparameters(logger=False)
        if roi_margin is not None and float(roi_margin) < 0:
            raise ConfigError(f"data.roi_margin={roi_margin}: use mm >= 0 around the body, or null for the fixed roi_spacing")
        self.roi = RoiSpec.from_settings(
            {"roi_size": roi_size, "roi_spacing": roi_spacing, "roi_margin": roi_margin}, volume_spacing
        )
        self.checks = IngestChecks.from_config(ingest)
        self.n_folds = max(2, int(round(1 / val_fraction)))
        if fold is not None and not 0 <= fold < self.n_folds:
            raise ConfigError(
                f"data.fold={fold} is not one of the {self.n_folds} folds (0..{self.n_folds - 1}) that val_fraction gives"
            )
        if roi_source not in ("given", "predicted"):
            raise ConfigError(f"data.roi_source={roi_source!r}: use 'given' (the cohort's masks) or 'predicted'")
        if roi_source == "predicted" and not predicted_masks:
            raise ConfigError(
                "data.roi_source=predicted needs data.predicted_masks: run python -m ovcf.segment ckpt=<segmenter.ckpt> "
                "and pass the folder it prints"
            )
        if in_channels not in (1, 2):
            raise ConfigError(f"data.in_channels={in_channels}: use 1 (CT) or 2 (CT and the body mask)")
        if sampler not in (None, "balanced"):
            raise ConfigError(f"data.sampler={sampler!r}: use null (shuffle) or balanced")
        spec = scale_augment(augment, augment_strength)
        if augment_engine not in ("auto", "batch", "torchio"):
            raise ConfigError(f"data.augment_engine={augment_engine!r}: use auto, batch or torchio")
        batched = spec is not None and (augment_engine == "batch" or (augment_engine == "auto" and set(spec) <= set(BATCHED)))
        self.batch_augment = BatchAugment(spec, seed) if batched else None  # names its first unknown transform
        self.augment = None if batched else build_augment(spec)
        self.datasets: dict[str, VertebraDataset] = {}
        # Fail before any work when the folder, its CSV or a center name is wrong.
        if cohort is None:
            raise ConfigError(
                "no cohort: set data.cohort to a cohort folder (python -m ovcf.train and the other entry points "
                "generate the synthetic cohort when it is null; from Python use ovcf.synth.cohort.synthetic_cohort)"
            )
        dev, ext = check_centers(Path(cohort), dev_center, external_center)
        self.centers: dict[str, str | None] = {"dev": dev, "external": ext}

    @property
    def cohort_path(self) -> Path:
        return Path(self.hparams.cohort).expanduser()

    def prepare_data(self) -> None:
        if getattr(self, "cache", None) is not None:
            return  # Lightning calls this before fit, validate and test: check the files once
        hp = self.hparams
        masks = hp.predicted_masks if hp.roi_source == "predicted" else None
        self.cache = ingest(
            self.cohort_path, hp.cache_dir, self.roi, hp.key_file, hp.ingest_workers, hp.progress, self.checks, masks
        )
        if masks is not None:
            for line in predicted_mask_warnings(read_index(self.cache)):
                log.warning(line)

    def setup(self, stage: str | None = None) -> None:
        if self.datasets:
            return
        parts = self.split_rows()
        train = {"transform": self.augment, "batched": self.batch_augment is not None}
        self.datasets = {name: self._dataset(part, **(train if name == "train" else {})) for name, part in parts.items()}

    def split_rows(self) -> dict[str, list[dict]]:
        """Included index rows of each set: "train" and "val" (patient folds of the development center;
        no "val" with `fold=None`), "test" (none when the cohort has one center)."""
        hp = self.hparams
        self.prepare_data()
        index = read_index(self.cache)
        dev, ext = self.centers["dev"], self.centers["external"]  # resolved and checked in __init__
        rows = [r for r in index if r["included"]]
        dev_rows = [r for r in rows if r["center"] == dev]
        ext_rows = [r for r in rows if r["center"] == ext]
        if not dev_rows or (ext is not None and not ext_rows):
            empty = dev if not dev_rows else ext
            raise ConfigError(f"center '{empty}' has no included rows in {self.cohort_path}; see {self.cache / 'index.csv'}")
        folds = self.make_splits(index)["folds"]
        if hp.fold is None:  # a refit: no validation set
            parts = {"train": dev_rows}
        else:
            val_rows = set(folds[hp.fold]["rows"])
            parts = {
                "train": [r for r in dev_rows if r["row"] not in val_rows],
                "val": [r for r in dev_rows if r["row"] in val_rows],
            }
        return parts if ext is None else parts | {"test": ext_rows}

    def make_splits(self, index: list[dict] | None = None) -> dict:
        """Patient folds of the development center and the external test set, written to `splits.json`."""
        index = read_index(self.cache) if index is None else index
        self.splits = cohort_splits(index, self.centers["dev"], self.centers["external"], self.n_folds, self.hparams.seed)
        write_splits(self.cache / "splits.json", self.splits)
        return self.splits

    def _dataset(self, rows: list[dict], transform=None, batched: bool = False) -> VertebraDataset:
        """The samples of `rows`; with `batched` augmentation the mask channel joins after it."""
        hp = self.hparams
        mask_channel = hp.in_channels == 2 and not batched
        return load_samples(self.cache, rows, self.roi.size, hp.hu_window, transform, mask_channel, hp.seed)

    def on_after_batch_transfer(self, batch: dict, dataloader_idx: int) -> dict:
        """Training batches get the batched augmentation here, on the device the model trains on."""
        if self.batch_augment is None or self.trainer is None or not self.trainer.training:
            return batch
        mask = batch["mask"] if self.hparams.in_channels == 2 else None
        reads = getattr(self.trainer.lightning_module, "reads", None)  # a 2.5D network reads a slab: augment that alone
        reads = None if reads is None else reads(batch["image"].shape[2])
        image, mask = self.batch_augment(batch["image"], batch["index"].tolist(), batch["epoch"].tolist(), mask, reads)
        if mask is not None:
            batch["mask"], image = mask, torch.cat([image, mask.to(image.dtype)], 1)
        return batch | {"image": image}

    def _loader(self, name: str, shuffle: bool) -> DataLoader:
        """Training draws from an `EpochSampler` (order and augmentation fixed by seed and epoch), with
        `batch_size` the global batch: each of a DDP group's processes loads its share."""
        hp = self.hparams
        dataset, sampler, batch_size = self.datasets[name], None, hp.batch_size
        if shuffle:
            weights = None
            if hp.sampler == "balanced":
                labels = dataset.labels
                counts = torch.stack([(labels == 0).sum(), (labels == 1).sum()]).clamp(min=1).float()
                weights = (1.0 / counts)[labels.long()]
            sampler = EpochSampler(len(dataset), hp.seed, hp.batch_size, weights)
            batch_size = self._device_batch()
        return DataLoader(
            dataset,
            batch_size=batch_size,
            sampler=sampler,  # training: whole global batches only (no one-sample batch to break batch norm)
            num_workers=hp.num_workers,
            persistent_workers=hp.num_workers > 0,  # no epoch waits for a cold worker
            prefetch_factor=hp.prefetch if hp.num_workers > 0 else None,
        )

    def _device_batch(self) -> int:
        """`batch_size` split over a DDP group; refuses Lightning's own sharding on top of the sampler's."""
        size = world()[1]
        if size == 1:
            return self.hparams.batch_size
        connector = getattr(self.trainer, "_accelerator_connector", None)
        if getattr(connector, "use_distributed_sampler", False):
            raise ConfigError("distributed training needs trainer.use_distributed_sampler=false (trainer=ddp sets it)")
        if self.hparams.batch_size % size:
            raise ConfigError(f"data.batch_size={self.hparams.batch_size} does not split over {size} processes")
        return self.hparams.batch_size // size

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader | list:
        return self._loader("val", shuffle=False) if "val" in self.datasets else []

    def test_dataloader(self) -> DataLoader:
        return self._loader(self._test_set(), shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        return self._loader(self._test_set(), shuffle=False)

    def _test_set(self) -> str:
        """The test set's name; for a one-center cohort (which has none) one clear line instead of a KeyError."""
        if self.centers["external"] is None:
            raise ConfigError(
                f"the cohort has one center ({self.centers['dev']}) and no external center: nothing to test; "
                "score another cohort with python -m ovcf.evaluate run=<run> cohort=<folder>"
            )
        return "test"

    def summary(self) -> str:
        """One line per split: rows, patients and labels, for the log."""
        lines = []
        for name, ds in self.datasets.items():
            n_acute = int(ds.labels.sum())
            patients = len({r["pseudonym"] for r in ds.rows})
            center = self.centers["external" if name == "test" else "dev"]
            counts = f"{n_acute} acute, {len(ds) - n_acute} chronic"
            lines.append(f"{name:>5}: center {center}, {len(ds)} vertebrae of {patients} patients ({counts})")
        return "\n".join([*lines, *self.center_note()])

    def center_note(self) -> list[str]:
        """The log's note for a one-center cohort (no external center, so no test line); else none."""
        return [] if self.centers["external"] is not None else [f" note: {one_center_note(self.centers['dev'])}"]
