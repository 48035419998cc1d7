"""Models: backbones, aggregators, local heads, one registry (``create``, ``list_models``)."""

from placerank.models.registry import create, list_models, register_model  # noqa: F401
