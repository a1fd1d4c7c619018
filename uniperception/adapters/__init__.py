"""Modality adapters: raw input → ``B×C'×H×W`` maps (see :mod:`uniperception.adapters.base`)."""

from .base import ADAPTERS, AdapterConfig, ModalityAdapter, build_adapter, register_adapter
from .image import ImageAdapter, ImageConfig

__all__ = [
    "ADAPTERS",
    "AdapterConfig",
    "ImageAdapter",
    "ImageConfig",
    "ModalityAdapter",
    "build_adapter",
    "register_adapter",
]
