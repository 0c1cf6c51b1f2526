"""Networks by name: `create_model("densenet121", ...)`; see `list_models()`."""

from ovcf.models import classifiers, segmenters, umamba, unetr_pp  # noqa: F401  (register the networks)
from ovcf.models.registry import create_model, list_models, register_model

__all__ = ["create_model", "list_models", "register_model"]
