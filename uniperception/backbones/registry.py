"""Model registry: ``create_model`` / ``list_models`` and pretrained-weight tags, timm style.

Builders register themselves with :func:`register_model`; each may carry pretrained configurations
(:class:`PretrainedCfg`) under tags such as ``in1k`` / ``in22k`` / ``in22k_ft_in1k_384`` so that
``create_model("unireplknet_s.in22k", pretrained=True)`` resolves the official file. When timm is installed the
same names are registered with timm as well (see :mod:`uniperception.backbones._timm`).
"""

from __future__ import annotations

import difflib
import fnmatch
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from torch import nn

from ..errors import UnknownModelError

__all__ = [
    "PretrainedCfg",
    "create_model",
    "get_pretrained_cfg",
    "is_model",
    "list_models",
    "register_model",
    "register_variant",
]

F = TypeVar("F", bound=Callable[..., nn.Module])

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class PretrainedCfg:
    """Where a pretrained weight lives and how its inputs must be prepared (timm's ``pretrained_cfg``)."""

    tag: str
    filename: str
    hf_hub_id: str | None = None
    num_classes: int = 1000
    input_size: tuple[int, int, int] = (3, 224, 224)
    crop_pct: float = 0.875
    interpolation: str = "bicubic"
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    license: str = "apache-2.0"
    notes: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


_ENTRYPOINTS: dict[str, Callable[..., nn.Module]] = {}
_PRETRAINED: dict[str, list[PretrainedCfg]] = {}


def register_model(fn: F | None = None, *, pretrained_cfgs: list[PretrainedCfg] | tuple[PretrainedCfg, ...] = ()):
    """Register a builder under its function name, with its pretrained configurations (first = default).

    Usable as ``@register_model`` or ``@register_model(pretrained_cfgs=[...])``.
    """

    def wrap(f: F) -> F:
        _ENTRYPOINTS[f.__name__] = f
        _PRETRAINED[f.__name__] = list(pretrained_cfgs)
        return f

    return wrap(fn) if fn is not None else wrap


def register_variant(
    name: str,
    create: Callable[..., nn.Module],
    doc: str,
    pretrained_cfgs: list[PretrainedCfg] | tuple[PretrainedCfg, ...] = (),
) -> Callable[..., nn.Module]:
    """Register ``name`` as a builder ``(pretrained=False, pretrained_tag=None, **kwargs) -> create(...)``."""

    def builder(
        pretrained: bool | str | os.PathLike[str] = False, pretrained_tag: str | None = None, **kwargs: Any
    ) -> nn.Module:
        return create(pretrained, pretrained_tag, **kwargs)

    builder.__name__ = builder.__qualname__ = name
    builder.__doc__ = doc
    return register_model(builder, pretrained_cfgs=pretrained_cfgs)


def split_model_name_tag(name: str) -> tuple[str, str | None]:
    """``"unireplknet_s.in22k"`` → ``("unireplknet_s", "in22k")``; no tag → ``(name, None)``."""
    base, _, tag = name.partition(".")
    return base, tag or None


def _unknown(name: str) -> UnknownModelError:
    close = difflib.get_close_matches(name, list(_ENTRYPOINTS), n=3)
    hint = f" Did you mean {', '.join(close)}?" if close else ""
    return UnknownModelError(
        f"unknown model {name!r}.{hint} `uniperception.list_models()` lists the available names."
    )


def is_model(name: str) -> bool:
    """Whether ``name`` (without tag) is a registered architecture."""
    return split_model_name_tag(name)[0] in _ENTRYPOINTS


def get_pretrained_cfg(name: str) -> PretrainedCfg | None:
    """The pretrained configuration of ``name`` (``arch`` or ``arch.tag``); ``None`` if it has none."""
    base, tag = split_model_name_tag(name)
    if base not in _ENTRYPOINTS:
        raise _unknown(base)
    cfgs = _PRETRAINED.get(base, [])
    if tag is None:
        return cfgs[0] if cfgs else None
    for cfg in cfgs:
        if cfg.tag == tag:
            return cfg
    tags = ", ".join(c.tag for c in cfgs) or "none"
    raise UnknownModelError(f"model {base!r} has no pretrained tag {tag!r} (available: {tags})")


def list_models(pattern: str = "*", pretrained: bool = False) -> list[str]:
    """Registered model names matching a shell-style ``pattern``; with ``pretrained=True``, ``name.tag`` ones."""
    names: list[str] = []
    for base in sorted(_ENTRYPOINTS):
        if pretrained:
            names.extend(f"{base}.{c.tag}" for c in _PRETRAINED[base])
        else:
            names.append(base)
    return [n for n in names if fnmatch.fnmatchcase(n, pattern)]


def create_model(name: str, pretrained: bool | str | os.PathLike[str] = False, **kwargs: Any) -> nn.Module:
    """Build a registered model by name, optionally with pretrained weights.

    Args:
        name: ``arch`` or ``arch.tag`` (e.g. ``"unireplknet_s.in22k_ft_in1k_384"``), or ``"timm:<name>"`` for
            any timm model wrapped as a backbone (:class:`~uniperception.backbones.timm_backbone.TimmBackbone`).
        pretrained: ``False``; ``True`` to fetch the official weights of the tag through the Hugging Face hub
            cache (works offline when the file is cached); or a local checkpoint file or a directory holding it.
        **kwargs: passed to the architecture (``num_classes``, ``in_chans``, ``deploy``, ``features_only``, …).

    Raises:
        UnknownModelError: the name or tag is not registered.
        CheckpointError: the weights cannot be found or do not match the model.
    """
    if name.startswith("timm:"):  # any timm model, e.g. a peer trained with the same recipe
        from .timm_backbone import TimmBackbone

        return TimmBackbone(name[len("timm:") :], pretrained=bool(pretrained), **kwargs)
    base, tag = split_model_name_tag(name)
    if base not in _ENTRYPOINTS:
        raise _unknown(base)
    if tag is not None:
        get_pretrained_cfg(name)  # validates the tag
        kwargs["pretrained_tag"] = tag
    return _ENTRYPOINTS[base](pretrained=pretrained, **kwargs)


def entrypoints() -> dict[str, Callable[..., nn.Module]]:
    """A copy of the name → builder table (used by the timm bridge)."""
    return dict(_ENTRYPOINTS)
