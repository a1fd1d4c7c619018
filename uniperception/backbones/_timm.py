"""Register uniperception's architectures with timm, when timm is installed.

``import uniperception`` must stay fast and must not import timm, so the registration runs either at once
(timm already imported) or right after timm's own import finishes (a one-shot import hook). Afterwards
``timm.create_model("unireplknet_a")`` builds our model and ``timm.utils.reparameterize_model`` works on it.
"""

from __future__ import annotations

import functools
import importlib.abc
import importlib.machinery
import importlib.util
import logging
import sys
from collections.abc import Callable
from types import ModuleType
from typing import Any

import torch
from torch import nn

from .registry import entrypoints

logger = logging.getLogger(__name__)
_registered = False

# keyword arguments timm.create_model passes that our builders do not take
_TIMM_ONLY = ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir")


def _adapt(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    @functools.wraps(fn)
    def builder(pretrained: bool = False, **kwargs: Any) -> nn.Module:
        cfg = kwargs.get("pretrained_cfg")
        for k in _TIMM_ONLY:
            kwargs.pop(k, None)
        tag = getattr(cfg, "tag", None)
        if tag:
            kwargs["pretrained_tag"] = tag
        device = kwargs.pop("device", None)
        if device is None:
            return fn(pretrained=pretrained, **kwargs)
        with torch.device(device):  # timm passes device=; our builders build under the device context
            return fn(pretrained=pretrained, **kwargs)

    builder.__module__ = __name__
    return builder


def register_with_timm() -> bool:
    """Register every architecture with timm's registry (idempotent). Returns False if timm is absent."""
    global _registered
    if _registered:
        return True
    try:
        from timm.models import _registry as timm_registry
    except ImportError:
        return False
    for name, fn in entrypoints().items():
        if name in timm_registry._model_entrypoints and timm_registry._model_to_module.get(name) != "_timm":
            logger.warning("timm already has a model named %s; not overriding it", name)
            continue
        if name not in timm_registry._model_entrypoints:
            timm_registry.register_model(_adapt(fn))
    _registered = True
    return True


class _RegisterAfterTimmImport(importlib.abc.MetaPathFinder):
    """Wraps timm's loader so that our models are registered as soon as ``import timm`` completes."""

    def find_spec(self, fullname: str, path: Any, target: ModuleType | None = None) -> importlib.machinery.ModuleSpec | None:
        if fullname != "timm":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec("timm")
        if spec is None or spec.loader is None:
            return None
        exec_module = spec.loader.exec_module

        def exec_and_register(module: ModuleType) -> None:
            exec_module(module)
            try:
                register_with_timm()
            except Exception:  # never break the user's `import timm`
                logger.exception("could not register uniperception models with timm")

        spec.loader.exec_module = exec_and_register  # type: ignore[method-assign]
        return spec


def install() -> None:
    """Register now if timm is imported, else once it is (no-op if timm is not installed)."""
    if "timm" in sys.modules:
        register_with_timm()
    elif importlib.util.find_spec("timm") is not None:
        if not any(isinstance(f, _RegisterAfterTimmImport) for f in sys.meta_path):
            sys.meta_path.insert(0, _RegisterAfterTimmImport())
