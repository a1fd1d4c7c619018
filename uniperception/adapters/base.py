"""The adapter contract: raw input of one modality → ``B×C'×H×W`` maps for an image-shaped backbone.

An adapter has two halves, as a Hugging Face feature extractor and model do:

* a **processor** (:meth:`ModalityAdapter.preprocess`), with no learnable weights: decoding, resampling,
  filterbanks, frame sampling, point normalisation, windowing. It turns *one* raw input into a tensor whose
  leading axis enumerates the pieces that input is scored as (sliding windows of a long recording, temporal
  clips of a video; usually 1). Processors are deterministic unless ``train=True`` asks for augmentation.
* an **embedding** (:meth:`ModalityAdapter.forward`, an ``nn.Module`` that may learn) turning a batch of
  processed pieces into ``B·V × out_channels × H × W`` maps, where ``V = views`` images per piece (4 for the
  multi-view point-cloud projection, else 1).

An adapter is configured by a small dataclass (:class:`AdapterConfig`) that bundles save in ``config.json``;
``build_adapter(modality, **config)`` rebuilds it. Adapters know nothing of training or of the backbone.
"""

from __future__ import annotations

import dataclasses
from abc import abstractmethod
from typing import Any, ClassVar

from torch import Tensor, nn

from ..errors import InvalidInputError

__all__ = ["ADAPTERS", "AdapterConfig", "ModalityAdapter", "build_adapter", "register_adapter"]

MODALITIES = ("audio", "video", "points", "image", "series")


@dataclasses.dataclass
class AdapterConfig:
    """Base class of adapter configurations (plain JSON-serialisable fields only)."""

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (tuples become lists)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> AdapterConfig:
        """Inverse of :meth:`to_dict`; unknown keys are an error (a typo must not pass silently)."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise InvalidInputError(f"unknown {cls.__name__} field(s): {sorted(unknown)}")
        kwargs = {}
        for f in dataclasses.fields(cls):
            if f.name in d:
                v = d[f.name]
                kwargs[f.name] = tuple(v) if isinstance(v, list) and "tuple" in str(f.type) else v
        return cls(**kwargs)


class ModalityAdapter(nn.Module):
    """Base class of every adapter (see the module docstring for the contract)."""

    #: the modality string ("audio", "video", "points", "image", "series")
    modality: ClassVar[str] = ""
    #: the configuration class of this adapter
    config_class: ClassVar[type[AdapterConfig]] = AdapterConfig
    #: images the embedding emits per processed piece (the head pools them)
    views: int = 1

    def __init__(self, config: AdapterConfig) -> None:
        super().__init__()
        self.config = config

    @property
    @abstractmethod
    def out_channels(self) -> int:
        """``C'``: channels of the maps the embedding emits (the backbone's ``in_chans``)."""

    @abstractmethod
    def preprocess(self, x: Any, *, train: bool = False, **kwargs: Any) -> Tensor:
        """One raw input → a tensor ``[pieces, ...]`` ready for batching (no learnable weights)."""

    @abstractmethod
    def forward(self, batch: Tensor) -> Tensor:
        """A batch of processed pieces ``[B, ...]`` → ``[B·views, out_channels, H, W]``."""

    def get_config(self) -> dict[str, Any]:
        """What a bundle stores to rebuild this adapter."""
        return {"modality": self.modality, **self.config.to_dict()}


ADAPTERS: dict[str, type[ModalityAdapter]] = {}


def register_adapter(cls: type[ModalityAdapter]) -> type[ModalityAdapter]:
    """Class decorator: make ``build_adapter(cls.modality, ...)`` build ``cls``."""
    ADAPTERS[cls.modality] = cls
    return cls


def build_adapter(modality: str, **config: Any) -> ModalityAdapter:
    """Build the adapter of ``modality`` from configuration fields (as stored by :meth:`get_config`)."""
    if modality not in ADAPTERS:
        _import_builtin_adapters()
    if modality not in ADAPTERS:
        raise InvalidInputError(f"unknown modality {modality!r}; choose from {sorted(ADAPTERS) or MODALITIES}")
    cls = ADAPTERS[modality]
    config.pop("modality", None)
    return cls(cls.config_class.from_dict(config))


def _import_builtin_adapters() -> None:
    import importlib

    for name in MODALITIES:
        try:
            importlib.import_module(f"uniperception.adapters.{name}")
        except ModuleNotFoundError as e:  # a modality module not written yet
            if e.name != f"uniperception.adapters.{name}":
                raise

