"""Checkpoints and weight files are read as data, never as code.

A pickle can carry any Python call, and checkpoints and system folders travel between sites. So
a Lightning checkpoint is read with torch's weights-only unpickler (tensors and plain values; our
tasks keep primitive init args, so their checkpoints need nothing else), an exported system's
weights are safetensors (a JSON header and raw tensors), and a task is rebuilt from its init args
and a state dict rather than by Lightning's `load_from_checkpoint`.
"""

from __future__ import annotations

import pickle
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_model, save_model

from ovcf.errors import ConfigError


def read_checkpoint(path: Path) -> dict:
    """A checkpoint's contents, unpickled by torch's weights-only loader (no Python object is built).

    Raises:
        ConfigError: the file is not a checkpoint, or it holds objects other than tensors and
            plain values (which a safe loader refuses: unpickling them could run code).
    """
    path = Path(path)
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise ConfigError(
            f"checkpoint {path} refused: it holds Python objects other than tensors and plain values, and loading "
            "them could run code; use a checkpoint that ovcf.train wrote"
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError) as exc:
        raise ConfigError(
            f"checkpoint {path} cannot be read ({type(exc).__name__}); pass a checkpoint that ovcf.train wrote"
        ) from None
    if not isinstance(raw, dict) or not isinstance(raw.get("state_dict"), Mapping):
        raise ConfigError(f"checkpoint {path} holds no model weights (state_dict); pass a checkpoint that ovcf.train wrote")
    return raw


def build_task(cls: type, hparams: Mapping, source: Path):
    """`cls(**hparams)`: a task rebuilt from the init args its checkpoint or system recorded."""
    try:
        return cls(**dict(hparams))
    except (TypeError, ValueError, KeyError) as exc:
        raise ConfigError(
            f"{source}: its hyper-parameters do not build a {cls.__name__} of this ovcf ({exc}); retrain or re-export"
        ) from None


def load_state(task: torch.nn.Module, state_dict: Mapping, source: Path, device: str = "cpu"):
    """Loads `state_dict` into `task` (all keys must match); returns it in eval mode on `device`."""
    try:
        task.load_state_dict(dict(state_dict))
    except RuntimeError as exc:
        raise ConfigError(f"{source}: its weights do not fit this {type(task).__name__}: {_first_line(exc)}") from None
    return task.to(device).eval()


def save_weights(task: torch.nn.Module, path: Path, metadata: dict[str, str] | None = None) -> None:
    """The task's weights as safetensors (shared tensors are stored once), with string `metadata` in its header."""
    path.parent.mkdir(parents=True, exist_ok=True)
    save_model(task, str(path), metadata=metadata)


def load_weights(task: torch.nn.Module, path: Path, device: str = "cpu"):
    """Loads a safetensors file into `task`; anything else (a pickle included) is refused without being run."""
    try:
        load_model(task, str(path), strict=True, device="cpu")
    except (SafetensorError, OSError, ValueError) as exc:
        raise ConfigError(
            f"{path} is not a safetensors weight file ({type(exc).__name__}); nothing in it was run. "
            "Re-export the system with python -m ovcf.export"
        ) from None
    except RuntimeError as exc:
        raise ConfigError(f"{path}: its weights do not fit this {type(task).__name__}: {_first_line(exc)}") from None
    return task.to(device).eval()


def _first_line(exc: Exception) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[0][:300] if lines else type(exc).__name__
