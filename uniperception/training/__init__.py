"""One training engine for every modality: config, collate, loop, checkpoints, DDP."""

from .collate import AdapterCollate, default_unpack
from .config import TrainConfig, load_recipe
from .engine import Callback, Trainer, param_groups, seed_everything

__all__ = [
    "AdapterCollate",
    "Callback",
    "TrainConfig",
    "Trainer",
    "default_unpack",
    "load_recipe",
    "param_groups",
    "seed_everything",
]
