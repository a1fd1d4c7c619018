"""Backbones: pure image-shaped networks (no modality knowledge), one file per architecture."""

from . import _timm
from .registry import PretrainedCfg, create_model, get_pretrained_cfg, is_model, list_models, register_model
from .replknet import REPLKNET_VARIANTS, RepLKNet
from .slak import SLAK_VARIANTS, SLaK
from .unireplknet import UNIREPLKNET_VARIANTS, UniRepLKNet, default_kernel_sizes

__all__ = [
    "REPLKNET_VARIANTS",
    "SLAK_VARIANTS",
    "UNIREPLKNET_VARIANTS",
    "PretrainedCfg",
    "RepLKNet",
    "SLaK",
    "UniRepLKNet",
    "create_model",
    "default_kernel_sizes",
    "get_pretrained_cfg",
    "is_model",
    "list_models",
    "register_model",
]

_timm.install()
