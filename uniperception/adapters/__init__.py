"""Modality adapters: raw input → ``B×C'×H×W`` maps (see :mod:`uniperception.adapters.base`)."""

from .audio import AudioAdapter, AudioConfig, load_audio
from .base import ADAPTERS, AdapterConfig, ModalityAdapter, build_adapter, register_adapter
from .image import ImageAdapter, ImageConfig
from .points import PointCloudAdapter, PointsConfig, load_points
from .series import SeriesAdapter, SeriesConfig, SeriesStats, denormalize, estimate_period, normalize
from .video import VideoAdapter, VideoConfig

__all__ = [
    "ADAPTERS",
    "AdapterConfig",
    "AudioAdapter",
    "AudioConfig",
    "ImageAdapter",
    "ImageConfig",
    "ModalityAdapter",
    "PointCloudAdapter",
    "PointsConfig",
    "SeriesAdapter",
    "SeriesConfig",
    "SeriesStats",
    "VideoAdapter",
    "VideoConfig",
    "build_adapter",
    "denormalize",
    "estimate_period",
    "load_audio",
    "load_points",
    "normalize",
    "register_adapter",
]
