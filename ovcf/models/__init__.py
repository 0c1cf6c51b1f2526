"""Networks by name: `create_model("densenet121", ...)`; see `list_models()`.

Every module of this folder registers its networks when imported, and all are imported here, so a
new network is one new module (with `@register_model`) and one config in `conf/model/`.
"""

import importlib
import pkgutil

from ovcf.models.registry import create_model, list_models, register_model

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["create_model", "list_models", "register_model"]
