"""uniperception: universal perception with large-kernel ConvNets (UniRepLKNet, RepLKNet, SLaK).

Start with :func:`create_model` / :func:`list_models`, re-parameterise any model for inference with
:func:`reparameterize`, and load official weights with :func:`uniperception.checkpoints.load_official`.
"""

__version__ = "0.1.0"

from . import checkpoints, errors
from ._alloc import keep_freed_memory
from .backbones import create_model, get_pretrained_cfg, list_models, register_model
from .errors import (
    CheckpointError,
    InvalidInputError,
    ModalityMismatchError,
    UniperceptionError,
    UnknownModelError,
    UnsupportedFormatError,
)
from .forecasting import Forecaster
from .layers.reparam import reparameterize
from .perceiver import Perceiver, Prediction, list_bundles

__all__ = [
    "CheckpointError",
    "Forecaster",
    "InvalidInputError",
    "ModalityMismatchError",
    "Perceiver",
    "Prediction",
    "UniperceptionError",
    "UnknownModelError",
    "UnsupportedFormatError",
    "__version__",
    "checkpoints",
    "create_model",
    "errors",
    "get_pretrained_cfg",
    "keep_freed_memory",
    "list_bundles",
    "list_models",
    "register_model",
    "reparameterize",
]
