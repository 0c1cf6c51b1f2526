"""One registry of networks under the names users already know (as timm's `create_model`)."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from ovcf.errors import ConfigError

TASKS = ("classification", "segmentation")
_MODELS: dict[str, tuple[str, Callable[..., nn.Module]]] = {}


def register_model(name: str, task: str = "classification"):
    """Decorator: makes a network factory available to `create_model(name, ...)` for one task.

    The task is kept so that a segmenter's name given to the classifier (or the reverse) fails with
    the list of names that task can use, not deep inside the network.
    """
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")

    def add(factory: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        _MODELS[name] = (task, factory)
        return factory

    return add


def list_models(task: str | None = None) -> list[str]:
    """Registered names, all or those of one task."""
    return sorted(name for name, (t, _) in _MODELS.items() if task is None or t == task)


def create_model(name: str, task: str | None = None, **kwargs) -> nn.Module:
    """Builds the network registered as `name` (for `task`, if given) with the factory's keyword arguments."""
    if name not in _MODELS or (task is not None and _MODELS[name][0] != task):
        what = f"{task} model" if task else "model"
        raise ConfigError(f"unknown {what} '{name}'; choose one of: {', '.join(list_models(task))}")
    return _MODELS[name][1](**kwargs)


def model_task(name: str) -> str | None:
    """The task a registered network serves, or None for an unknown name."""
    return _MODELS[name][0] if name in _MODELS else None
