"""One training engine for every modality: config, collate, loop, checkpoints, DDP."""

from .collate import AdapterCollate, default_unpack
from .config import TrainConfig, load_recipe
from .engine import Callback, Trainer, param_groups, seed_everything
from .recipes import MixedDataset, RecipeResult, apply_overrides, build_dataset, run_recipe
from .sparse import SPARSE_PRESETS, DynamicSparsity, LayerDensity

__all__ = [
    "SPARSE_PRESETS",
    "AdapterCollate",
    "Callback",
    "DynamicSparsity",
    "LayerDensity",
    "MixedDataset",
    "RecipeResult",
    "TrainConfig",
    "Trainer",
    "apply_overrides",
    "build_dataset",
    "default_unpack",
    "load_recipe",
    "param_groups",
    "run_recipe",
    "seed_everything",
]
