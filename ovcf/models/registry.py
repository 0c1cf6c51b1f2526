"""One registry of networks under the names users already know (as timm's `create_model`)."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from ovcf.errors import ConfigError

_MODELS: dict[str, Callable[..., nn.Module]] = {}


def register_model(name: str):
    """Decorator: makes a network factory available to `create_model(name, ...)`."""

    def add(factory: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        _MODELS[name] = factory
        return factory

    return add


def list_models() -> list[str]:
    return sorted(_MODELS)


def create_model(name: str, **kwargs) -> nn.Module:
    """Builds the network registered as `name` with the factory's keyword arguments."""
    if name not in _MODELS:
        raise ConfigError(f"unknown model '{name}'; choose one of: {', '.join(list_models())}")
    return _MODELS[name](**kwargs)
