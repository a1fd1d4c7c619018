"""Datasets for every modality, offline: generated (keywords, shapes, sprites), bundled or loaded from folders.

Datasets know nothing of models: they return raw-ish samples (waveform + sample rate, points, uint8 video frames,
pandas frames / float windows). All are map-style :class:`torch.utils.data.Dataset` s, deterministic from a seed,
with ``classes`` where applicable and optional ``transform`` / ``target_transform`` callables. Generated datasets
are written once into :func:`cache_dir` (``$UNIPERCEPTION_CACHE``, default ``~/.cache/uniperception``).
See ``docs/datasets.md`` for the data cards.
"""

from ._common import MissingDependencyError, cache_dir
from .keywords import CLASSES as KEYWORD_CLASSES
from .keywords import (
    DISTRACTOR_WORDS,
    KEYWORDS,
    KeywordSpeech,
    list_voices,
    voice_split,
)
from .modelnet import ModelNet, load_mesh_points
from .shapes import SHAPE_CLASSES, Shapes, sample_shape
from .speech_commands import SPEECH_COMMANDS_V2_LABELS, SpeechCommands
from .sprites import DIRECTIONS, MovingSprites, render_sprite_clip, write_mp4
from .timeseries import (
    CLASSIFICATION_DATASETS,
    FORECASTING_SERIES,
    SeriesClassification,
    SeriesClassificationData,
    WindowDataset,
    load_classification,
    load_ett_csv,
    load_series,
)
from .video_folder import VIDEO_EXTENSIONS, VideoFolder, read_video_frames, uniform_indices

__all__ = [
    "CLASSIFICATION_DATASETS",
    "DIRECTIONS",
    "DISTRACTOR_WORDS",
    "FORECASTING_SERIES",
    "KEYWORDS",
    "KEYWORD_CLASSES",
    "SHAPE_CLASSES",
    "SPEECH_COMMANDS_V2_LABELS",
    "VIDEO_EXTENSIONS",
    "KeywordSpeech",
    "MissingDependencyError",
    "ModelNet",
    "MovingSprites",
    "SeriesClassification",
    "SeriesClassificationData",
    "Shapes",
    "SpeechCommands",
    "VideoFolder",
    "WindowDataset",
    "cache_dir",
    "list_voices",
    "load_classification",
    "load_ett_csv",
    "load_mesh_points",
    "load_series",
    "read_video_frames",
    "render_sprite_clip",
    "sample_shape",
    "uniform_indices",
    "voice_split",
    "write_mp4",
]
