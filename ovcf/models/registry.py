"""One registry of networks under the names users already know (as timm's `create_model`).

A network registers what only it knows: the task it serves and, for a network trained on patches,
which inputs it accepts (`input_size`). Callers such as `ovcf.tasks.SegmentationTask` then build any
registered network for a patch size without special cases, so adding a network touches only its own
module and its config.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from torch import nn

from ovcf.errors import ConfigError

TASKS = ("classification", "segmentation")

InputSize = Callable[[dict, list[int]], dict]
"""`input_size(kwargs, patch_size) -> kwargs`: the factory's keyword arguments for inputs of `patch_size`
(e.g. a size the network is built for), or a ConfigError saying why the patch does not suit it."""

_MODELS: dict[str, tuple[str, Callable[..., nn.Module]]] = {}
_INPUT_SIZE: dict[str, InputSize] = {}


def register_model(name: str, task: str = "classification", input_size: InputSize | None = None):
    """Decorator: makes a network factory available to `create_model(name, ...)` for one task.

    The task is kept so that a segmenter's name given to the classifier (or the reverse) fails with
    the list of names that task can use, not deep inside the network.

    Args:
        name: the name users give.
        task: one of `TASKS`.
        input_size: the network's rule for the patches it is trained and run on (see `InputSize` and
            `fit_to_patch`); None accepts every size and changes nothing.
    """
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")

    def add(factory: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        _MODELS[name] = (task, factory)
        if input_size is None:
            _INPUT_SIZE.pop(name, None)
        else:
            _INPUT_SIZE[name] = input_size
        return factory

    return add


def list_models(task: str | None = None) -> list[str]:
    """Registered names, all or those of one task."""
    return sorted(name for name, (t, _) in _MODELS.items() if task is None or t == task)


def _check_name(name: str, task: str | None) -> None:
    if name not in _MODELS or (task is not None and _MODELS[name][0] != task):
        what = f"{task} model" if task else "model"
        raise ConfigError(f"unknown {what} '{name}'; choose one of: {', '.join(list_models(task))}")


def fit_to_patch(name: str, kwargs: dict, patch_size: Sequence[int], task: str | None = None) -> dict:
    """The keyword arguments to build `name` with for inputs of `patch_size`: its registered `input_size`
    rule applied to `kwargs`, or `kwargs` unchanged when it declares none.

    Raises:
        ConfigError: an unknown name, or a patch size the network cannot take (the rule says why).
    """
    _check_name(name, task)
    rule = _INPUT_SIZE.get(name)
    return dict(kwargs) if rule is None else rule(dict(kwargs), [int(s) for s in patch_size])


def check_divisible(patch_size: Sequence[int], factor: int, why: str) -> None:
    """A common input-size rule: every axis of the patch a multiple of `factor` (`why`: the network's reason)."""
    for axis, size in enumerate(patch_size, start=1):
        if factor > 1 and size % factor:
            near = [max(factor, round(s / factor) * factor) for s in patch_size]
            raise ConfigError(
                f"patch_size {list(patch_size)} is not divisible by {factor} ({why}) along axis {axis} ({size}): "
                f"use multiples of {factor}, e.g. {near}, or fewer stages"
            )


def create_model(name: str, task: str | None = None, input_size: Sequence[int] | None = None, **kwargs) -> nn.Module:
    """Builds the network registered as `name` (for `task`, if given) with the factory's keyword arguments.

    `input_size`, when given, is the patch size the network will see: the network's own rule for it is
    applied first (see `fit_to_patch`), so it is built for that size or refused with a clear error.
    """
    _check_name(name, task)
    if input_size is not None:
        kwargs = fit_to_patch(name, kwargs, input_size)
    return _MODELS[name][1](**kwargs)


def model_task(name: str) -> str | None:
    """The task a registered network serves, or None for an unknown name."""
    return _MODELS[name][0] if name in _MODELS else None
