"""Level classes: background 0, then one class per vertebral level in cranio-caudal order.

The segmentation task scores its level maps in these classes (a confusion matrix needs dense
indices, VerSe ids have gaps); VerSe ids stay the only labels written to disk.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ovcf.contract import LEVEL_IDS, LEVEL_ORDER
from ovcf.errors import ConfigError


def level_classes(levels: Sequence[str] | None = None) -> list[str]:
    """The levels a segmenter predicts, in cranio-caudal order; class i + 1 is the i-th of them, 0 is background.

    The order is fixed by `LEVEL_ORDER` rather than by the caller, so `["L2", "L1"]` and `["L1", "L2"]` give the same
    classes and a checkpoint's class indices never depend on how a config happened to list them.

    Args:
        levels: level names such as "L1"; None for every level in `LEVEL_ORDER` (C1..L6 with T13).

    Raises:
        ConfigError: an unknown or repeated level, or an empty list.
    """
    if levels is None:
        return list(LEVEL_ORDER)
    if isinstance(levels, str):
        levels = [levels]
    names = [str(level) for level in levels]
    unknown = sorted(set(names) - set(LEVEL_ORDER))
    if unknown:
        raise ConfigError(f"unknown level(s) {unknown}; levels are named {', '.join(LEVEL_ORDER)}")
    if len(set(names)) != len(names):
        raise ConfigError(f"levels {names} name a level twice; list each level once")
    if not names:
        raise ConfigError("levels is empty; name at least one level, e.g. ['L1'], or leave it unset for all levels")
    return [level for level in LEVEL_ORDER if level in names]


def class_to_verse(levels: Sequence[str] | None = None) -> list[int]:
    """VerSe id of every class index: entry 0 is background (0), entry i + 1 the id of `level_classes(levels)[i]`."""
    return [0, *(LEVEL_IDS[level] for level in level_classes(levels))]


def verse_to_class(levels: Sequence[str] | None = None) -> dict[int, int]:
    """Class index of every VerSe id the segmenter predicts (0 -> 0); ids of other levels are absent (see `encode_verse`)."""
    return {verse: c for c, verse in enumerate(class_to_verse(levels))}


def encode_verse(mask: torch.Tensor, levels: Sequence[str] | None = None) -> torch.Tensor:
    """A VerSe-labelled mask as class indices; vertebrae of levels not in `levels` become background.

    Levels outside the list are background rather than an error so that a model of the lumbar spine can be trained on
    whole-spine masks: those voxels are simply not what it was asked to find.
    """
    mask = mask.long()
    if mask.numel() and int(mask.min()) < 0:
        raise ValueError(f"mask holds negative label {int(mask.min())}; VerSe ids are >= 0")
    lut = torch.zeros(max(int(mask.max()) if mask.numel() else 0, max(LEVEL_IDS.values())) + 1, dtype=torch.long)
    for verse, c in verse_to_class(levels).items():
        lut[verse] = c
    return lut.to(mask.device)[mask]
