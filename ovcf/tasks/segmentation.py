"""Vertebral-body segmentation: a network finds the bodies, a slab classifier their region, a count names the levels.

The 3D segmenter (U-Net, UNETR++ or U-Mamba) predicts body vs background per voxel. A small 2D network
(`ovcf.models.regions`) reads each axial slab and says cervical, thoracic or lumbar (ribs beside the body, or
not); `ovcf.data.instances` then splits the bodies apart and counts them along the spine, anchored at the region
boundaries (the last rib), to give one VerSe id per body. Per-level classes would ask a patch to tell L2 from L3,
which it cannot see; a count can.
"""

from __future__ import annotations

from collections.abc import Sequence

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import WandbLogger
from monai.inferers import sliding_window_inference
from monai.losses import DeepSupervisionLoss, DiceCELoss

from ovcf.contract import LEVEL_IDS, LEVEL_ORDER
from ovcf.data.instances import REGIONS, Assignment, assign_levels
from ovcf.data.levels import encode_verse, level_classes
from ovcf.data.sampling import seed_epoch
from ovcf.data.spine import bone_profile, spine_window
from ovcf.errors import ConfigError
from ovcf.eval.metrics import dice, label_confusion, level_scores
from ovcf.eval.overlay import overlay
from ovcf.models import create_model
from ovcf.models.regions import SliceRegionNet, axial_slabs, slice_regions
from ovcf.tasks.classification import plain

STAGES = ("val", "test")


def _plain_list(value) -> list | None:
    """A list of primitives, also when Hydra passed a ListConfig (checkpoints must hold only primitives)."""
    if value is None:
        return None
    if isinstance(value, str):
        return [value]
    if hasattr(value, "_content"):  # omegaconf ListConfig
        from omegaconf import OmegaConf

        return OmegaConf.to_container(value, resolve=True)
    return list(value)


def _patch_size(patch_size) -> list[int]:
    size = _plain_list(patch_size) or []
    try:
        ints = [int(s) for s in size]
    except (TypeError, ValueError):
        ints = []
    if len(ints) != 3 or min(ints) < 1 or ints != list(size):
        raise ConfigError(f"patch_size {patch_size} must be three positive ints, e.g. [64, 64, 64]")
    return ints


class SegmentationTask(L.LightningModule):
    """Trains a registry segmenter on patches with Dice + CE and evaluates whole volumes by sliding windows.

    Batches carry region classes (0 background, 1 + `REGIONS.index(r)`), with the voxels where two bodies touch left
    empty so that every body stays its own component (see `ovcf.data.instances.region_target`). The segmenter learns
    body vs background from them (Dice + CE); the slab classifier `regions` learns each axial slice's region
    (cross-entropy, added to the loss). Evaluation and `predict_volume` give each predicted body voxel its slice's
    region and count levels with `assign_levels`.

    Deep supervision: networks that return several outputs in training (a list/tuple, full resolution first, or
    DynUNet's stack on dim 1) are trained with MONAI's `DeepSupervisionLoss` (weights 1, 1/2, 1/4, ...); in eval mode
    every registry segmenter returns the full-resolution logits alone.

    Metrics (per stage "val"/"test"): `{stage}/loss` (Dice + CE of the bodies on the whole volume); `{stage}/dice`
    (per volume, the mean Dice over the levels present in its ground truth after level assignment, background
    excluded, see `level_scores`; averaged over volumes); `{stage}/body_dice` (all bodies against all bodies, levels
    ignored: the segmentation alone); `{stage}/region_accuracy` (share of axial slices through a body whose region
    the slab classifier names right); and at epoch end `{stage}/dice_<level>`, `{stage}/dice_fractured` and
    `{stage}/dice_intact` (Dice of each true body, pooled by whether the cohort names it fractured),
    `{stage}/level_accuracy` (share of true bodies whose majority predicted level is their own) and
    `{stage}/spurious_levels`. The epoch's scores are kept in `per_level_dice(stage)`, `fracture_dice(stage)` and
    `level_accuracy(stage)`, per process (not synced across devices).

    Args:
        model_name: a name from `ovcf.models.list_models("segmentation")`.
        model_kwargs: keyword arguments of that network's factory, except in_channels/out_channels (one CT channel,
            background + regions); for "unetr_pp" img_size defaults to `patch_size`.
        levels: the levels scored and returned (default: every level); the network still learns every body, since
            the count needs them all.
        patch_size: training patch and sliding-window size; must suit the network (multiple of 32 for unetr_pp,
            of the product of strides for unet).
        lr: AdamW learning rate (cosine-annealed over the run when max_epochs is known).
        weight_decay: AdamW weight decay.
        sw_batch_size: windows per forward pass in sliding-window inference.
        sw_overlap: overlap of neighbouring windows (Gaussian-weighted blending).
        min_body_ml: predicted components smaller than this are noise, not bodies.
        region_slab: axial slices per slab the region classifier reads (5 at 2 mm: a centimetre, enough for ribs that
            slope across several slices).
        region_min_voxels: training slices with fewer body voxels than this (disc edges) teach no region.
        spine_window_mm: on a whole volume, evaluation and prediction read an axial window this wide (mm) centred
            on the vertebral column (`ovcf.data.spine`), about the field of view it trained on; None: all of it.
        hu_window: the HU window of the input, which locating the column needs (the data module's `hu_window`).
    """

    def __init__(
        self,
        model_name: str = "unet",
        model_kwargs: dict | None = None,
        levels: list[str] | None = None,
        patch_size: Sequence[int] = (64, 64, 64),
        lr: float = 1e-3,
        weight_decay: float = 1e-5,
        sw_batch_size: int = 2,
        sw_overlap: float = 0.25,
        min_body_ml: float = 2.0,
        region_slab: int = 5,
        region_min_voxels: int = 16,
        spine_window_mm: float | None = 160.0,
        hu_window: Sequence[float] = (-250.0, 1250.0),
    ):
        super().__init__()
        model_kwargs = plain(model_kwargs)  # checkpoints must hold only primitives
        hu_window = [float(v) for v in _plain_list(hu_window)]
        levels = level_classes(_plain_list(levels))
        patch_size = _patch_size(patch_size)
        self.save_hyperparameters()
        self.levels = levels
        self.num_classes = 2  # background, body
        self.num_regions = len(REGIONS) + 1  # background + regions, as the batches' labels
        clash = sorted({"in_channels", "out_channels"} & set(model_kwargs))
        if clash:
            raise ConfigError(
                f"model_kwargs must not set {clash}: the input is one CT channel and the classes are background and body"
            )
        # input_size: the network's own rule fits its arguments to the patch (e.g. UNETR++'s img_size) or refuses it
        self.net = create_model(
            model_name, task="segmentation", input_size=patch_size, in_channels=1, out_channels=self.num_classes, **model_kwargs
        )
        if int(region_slab) < 1:
            raise ConfigError(f"region_slab must be at least 1 slice, got {region_slab}")
        self.regions = SliceRegionNet(int(region_slab), len(REGIONS))
        self.dice_ce = DiceCELoss(to_onehot_y=True, softmax=True)
        self.body_loss = DeepSupervisionLoss(self.dice_ce)
        keep = np.zeros(max(LEVEL_IDS.values()) + 1, bool)
        keep[[LEVEL_IDS[level] for level in levels]] = True
        self._keep = keep  # VerSe id -> scored and returned
        self._scores = {stage: self._empty_scores() for stage in STAGES}
        self.overlays: dict[str, list] = {stage: [] for stage in STAGES}

    def _empty_scores(self) -> dict:
        n = len(LEVEL_ORDER)
        return {"dice_sum": [0.0] * n, "dice_n": [0] * n, "identified": 0, "bodies": 0, "fractured": [], "intact": []}

    def forward(self, image: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        return self.net(image)

    def _label(self, batch: dict) -> torch.Tensor:
        image, label = batch["image"], batch["label"]
        if label.ndim == image.ndim - 1:
            label = label.unsqueeze(1)
        if label.numel() and (int(label.min()) < 0 or int(label.max()) >= self.num_regions):
            raise ValueError(
                f"label holds class {int(label.max())} but the task has classes 0..{self.num_regions - 1} "
                f"(background + {', '.join(REGIONS)}): give region classes, see ovcf.data.instances.region_target"
            )
        return label

    def on_train_epoch_start(self) -> None:
        seed_epoch(self.current_epoch)  # patches come from the EpochSampler's (index, epoch) keys

    def training_loss(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """(total, region part) of the training loss of a batch of patches: body Dice + CE plus the slab classifier's CE."""
        image, label = batch["image"], self._label(batch)
        out = self.net(image)
        if torch.is_tensor(out) and out.ndim == image.ndim + 1:  # DynUNet deep supervision: (B, heads, C, ...)
            out = list(out.unbind(1))
        # float labels: DeepSupervisionLoss downsamples them with F.interpolate, which takes no integer tensors
        region = self.region_loss(image, label)
        return self.body_loss(out, (label > 0).float()) + region, region

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss, region_loss = self.training_loss(batch)
        n = len(batch["image"])
        self.log("train/loss", loss, on_step=False, on_epoch=True, prog_bar=True, batch_size=n)
        self.log("train/region_loss", region_loss, on_step=False, on_epoch=True, batch_size=n)
        return loss

    def region_loss(self, image: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        """Cross-entropy of the slab classifier on the patch's slices through a body (0 if none is)."""
        target = slice_regions(label, self.hparams.region_min_voxels)
        keep = target >= 0
        if not keep.any():
            return image.new_zeros(())
        slabs = axial_slabs(image, self.hparams.region_slab)[keep]
        return F.cross_entropy(self.regions(slabs), target[keep])

    def slab_logits(self, image: torch.Tensor, chunk: int = 64) -> torch.Tensor:
        """Region logits of every axial slice of one volume (1, 1, X, Y, Z): (Z, regions), in chunks of slices."""
        slabs = axial_slabs(image, self.hparams.region_slab)
        return torch.cat([self.regions(part) for part in slabs.split(chunk)]) if len(slabs) else slabs.new_zeros(0, len(REGIONS))

    def slice_regions(self, image: torch.Tensor) -> torch.Tensor:
        """The region the slab classifier names for each axial slice, (B, Z), 0-based over `REGIONS`."""
        return torch.stack([self.slab_logits(image[b : b + 1]).argmax(1) for b in range(len(image))])

    @staticmethod
    def region_map(logits: torch.Tensor, slices: torch.Tensor) -> np.ndarray:
        """Region classes (B, X, Y, Z): each voxel the segmenter calls body gets its axial slice's region."""
        body = logits.argmax(1) > 0
        return torch.where(body, slices[:, None, None, :] + 1, 0).cpu().numpy()

    def sliding_window(self, image: torch.Tensor) -> torch.Tensor:
        """Logits of a whole volume (B, K, X, Y, Z) on its own grid; volumes smaller than a patch are padded and cropped back."""
        return sliding_window_inference(
            image,
            roi_size=tuple(self.hparams.patch_size),
            sw_batch_size=self.hparams.sw_batch_size,
            predictor=self.net,
            overlap=self.hparams.sw_overlap,
            mode="gaussian",
        )

    def levels_of(self, regions: np.ndarray, spacing, image: torch.Tensor | None = None) -> tuple[np.ndarray, Assignment]:
        """VerSe ids (X, Y, Z) of a region map (RAS), restricted to `levels`, and how they were counted; with the
        windowed `image` (X, Y, Z) the count may also anchor at the pelvis (`ovcf.data.instances.on_pelvis`)."""
        bone = None if image is None else bone_profile(image.cpu().numpy(), spacing, self.hparams.hu_window)
        verse, assignment = assign_levels(regions, spacing, self.hparams.min_body_ml, bone)
        return self._restrict(verse), assignment

    def _restrict(self, verse: np.ndarray) -> np.ndarray:
        """VerSe ids of the levels in `levels`; every other id becomes background."""
        keep = self._keep[np.clip(verse, 0, len(self._keep) - 1)] & (verse < len(self._keep))
        return np.where(keep, verse, 0).astype(np.int64)

    def _evaluate(self, batch: dict, stage: str, batch_idx: int) -> None:
        image, label = batch["image"], self._label(batch)
        logits, slices = self.read_volumes(image, batch.get("spacing"))
        loss = self.dice_ce(logits, (label > 0).long())
        regions = self.region_map(logits, slices)
        truth_slices = slice_regions(label, 1).view(len(image), -1)
        through = truth_slices >= 0
        if through.any():
            accuracy = (slices[through] == truth_slices[through]).float().mean()
            self.log(f"{stage}/region_accuracy", accuracy, on_step=False, on_epoch=True, batch_size=int(through.sum()))
        scores = self._scores[stage]
        dices, bodies, spurious = [], [], []
        for b in range(len(image)):
            spacing = batch["spacing"][b].cpu().numpy() if "spacing" in batch else np.ones(3)
            pred, _ = self.levels_of(regions[b], spacing, image[b, 0])
            truth = self._restrict(batch["verse"][b, 0].cpu().numpy())
            cm = label_confusion(
                encode_verse(torch.from_numpy(pred)), encode_verse(torch.from_numpy(truth)), len(LEVEL_ORDER) + 1
            )
            per_level, identified, extra = level_scores(cm)
            present = ~per_level.isnan()
            fractured = set(batch["fractured"][b].nonzero().flatten().tolist()) if "fractured" in batch else set()
            for i in present.nonzero().flatten().tolist():
                scores["dice_sum"][i] += float(per_level[i])
                scores["dice_n"][i] += 1
                group = "fractured" if LEVEL_IDS[LEVEL_ORDER[i]] in fractured else "intact"
                scores[group].append(float(per_level[i]))
            scores["identified"] += int(identified.sum())
            scores["bodies"] += int(present.sum())
            if present.any():
                dices.append(float(per_level[present].mean()))
            body = dice(pred > 0, truth > 0)
            if body == body:
                bodies.append(body)
            spurious.append(float(extra.sum()))
            if len(self.overlays[stage]) < 4:
                self.overlays[stage].append((image[b, 0].cpu().numpy(), truth, pred))
        self.log(f"{stage}/loss", loss, on_step=False, on_epoch=True, prog_bar=True, batch_size=len(image))
        if dices:  # volumes without any vertebra have no Dice and do not enter the mean
            self.log(f"{stage}/dice", float(np.mean(dices)), on_step=False, on_epoch=True, prog_bar=True, batch_size=len(dices))
        if bodies:
            self.log(f"{stage}/body_dice", float(np.mean(bodies)), on_step=False, on_epoch=True, batch_size=len(bodies))
        self.log(f"{stage}/spurious_levels", float(np.mean(spurious)), on_step=False, on_epoch=True, batch_size=len(image))

    def _log_epoch(self, stage: str) -> None:
        for level, value in self.per_level_dice(stage).items():
            self.log(f"{stage}/dice_{level}", value)
        for group, value in self.fracture_dice(stage).items():
            self.log(f"{stage}/dice_{group}", value)
        accuracy = self.level_accuracy(stage)
        if accuracy == accuracy:  # not NaN
            self.log(f"{stage}/level_accuracy", accuracy)
        self._log_overlays(stage)

    def _log_overlays(self, stage: str) -> None:
        """Predicted vs true levels on mid-sagittal CT slices, to W&B when it logs (nothing otherwise)."""
        loggers = [lg for lg in (self.loggers or []) if isinstance(lg, WandbLogger)]
        if loggers and self.overlays[stage] and not self.trainer.sanity_checking:
            images = [overlay(*item) for item in self.overlays[stage]]
            # Scans differ in size: pad to one canvas (black), which W&B's image panel needs.
            h, w = max(i.shape[0] for i in images), max(i.shape[1] for i in images)
            images = [np.pad(i, ((0, h - i.shape[0]), (0, w - i.shape[1]), (0, 0))) for i in images]
            for lg in loggers:
                lg.log_image(f"{stage}/overlay", images=images, caption=["CT | truth | prediction"] * len(images))

    def per_level_dice(self, stage: str = "val") -> dict[str, float]:
        """Mean Dice of each level over the volumes of the last `stage` epoch whose ground truth contains it."""
        scores = self._scores[stage]
        return {level: s / n for level, s, n in zip(LEVEL_ORDER, scores["dice_sum"], scores["dice_n"]) if n}

    def fracture_dice(self, stage: str = "val") -> dict[str, float]:
        """Mean Dice of the true bodies the cohort names fractured, and of the others, in the last `stage` epoch."""
        scores = self._scores[stage]
        return {group: float(np.mean(scores[group])) for group in ("fractured", "intact") if scores[group]}

    def level_accuracy(self, stage: str = "val") -> float:
        """Share of the last `stage` epoch's ground-truth bodies whose majority predicted level is their own (NaN if none)."""
        scores = self._scores[stage]
        return scores["identified"] / scores["bodies"] if scores["bodies"] else float("nan")

    def _reset(self, stage: str) -> None:
        self._scores[stage] = self._empty_scores()
        self.overlays[stage] = []

    def on_validation_epoch_start(self) -> None:
        self._reset("val")

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self._evaluate(batch, "val", batch_idx)

    def on_validation_epoch_end(self) -> None:
        self._log_epoch("val")

    def on_test_epoch_start(self) -> None:
        self._reset("test")

    def test_step(self, batch: dict, batch_idx: int) -> None:
        self._evaluate(batch, "test", batch_idx)

    def on_test_epoch_end(self) -> None:
        self._log_epoch("test")

    def window(self, image: torch.Tensor, spacing) -> tuple[slice, slice]:
        """The X and Y ranges of one volume (X, Y, Z) that the segmenter reads: `spine_window_mm` around the column
        (the whole plane without a spacing or a window)."""
        mm = self.hparams.spine_window_mm
        if spacing is None or not mm:
            return slice(None), slice(None)
        spacing = spacing.cpu().numpy() if torch.is_tensor(spacing) else np.asarray(spacing, float)
        return spine_window(image.cpu().numpy(), spacing, self.hparams.hu_window, mm)

    def read_volumes(self, image: torch.Tensor, spacing=None) -> tuple[torch.Tensor, torch.Tensor]:
        """Body logits (B, 2, X, Y, Z) and slice regions (B, Z) of whole volumes, each read in its `window`;
        outside it, background. `spacing`: (B, 3) mm, or one (3,) for all, or None (no window)."""
        logits = image.new_zeros((len(image), self.num_classes, *image.shape[2:]))
        logits[:, 0] = 30.0  # background, certain
        slices = []
        for b in range(len(image)):
            at = None if spacing is None else (spacing[b] if np.ndim(spacing) == 2 else spacing)
            sx, sy = self.window(image[b, 0], at)
            part = image[b : b + 1, :, sx, sy]
            logits[b : b + 1, :, sx, sy] = self.sliding_window(part)
            slices.append(self.slice_regions(part)[0])
        return logits, torch.stack(slices)

    @torch.no_grad()
    def predict_regions(self, image: torch.Tensor, spacing=None) -> np.ndarray:
        """Region classes (X, Y, Z) of one volume (1, 1, X, Y, Z), in eval mode (restoring the previous mode);
        with its `spacing` (mm), read in the window around its column."""
        if image.ndim != 5 or tuple(image.shape[:2]) != (1, 1):
            raise ValueError(f"predict_volume takes one volume of shape (1, 1, X, Y, Z), got {tuple(image.shape)}")
        was_training = self.training
        self.eval()
        try:
            image = image.to(device=self.device, dtype=torch.float32)
            regions = self.region_map(*self.read_volumes(image, spacing))
        finally:
            self.train(was_training)
        return regions[0]

    def predict_volume(self, image: torch.Tensor, spacing=(1.0, 1.0, 1.0)) -> tuple[torch.Tensor, Assignment]:
        """VerSe ids (X, Y, Z), long, on the input's grid, of one windowed volume (1, 1, X, Y, Z) in RAS order.

        Args:
            image: the CT as the data module gives it (HU window scaled to 0..1).
            spacing: mm per voxel; the count drops pieces under `min_body_ml` and splits bodies taller than a body.

        Returns:
            (label map, how the levels were counted).
        """
        spacing = np.asarray(spacing, float)
        verse, assignment = self.levels_of(self.predict_regions(image, spacing), spacing, image[0, 0])
        return torch.from_numpy(verse).to(image.device), assignment

    def predict_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        spacing = batch["spacing"][0].cpu().numpy() if "spacing" in batch else (1.0, 1.0, 1.0)
        return self.predict_volume(batch["image"], spacing)[0]

    def configure_optimizers(self):
        opt = torch.optim.AdamW(self.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)
        epochs = self._trainer.max_epochs if self._trainer is not None else None
        if not epochs or epochs < 1:  # unknown or unbounded run: no schedule to anneal over
            return opt
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "epoch"}}
