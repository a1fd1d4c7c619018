"""Analysis tools: the effective receptive field (ERF) of a backbone, RepLKNet/SLaK style."""

from .erf import (
    THRESHOLDS,
    ERFResult,
    area_ratios,
    build_model,
    erf,
    generated_images,
    load_images,
    save_erf_grid,
)

__all__ = [
    "THRESHOLDS",
    "ERFResult",
    "area_ratios",
    "build_model",
    "erf",
    "generated_images",
    "load_images",
    "save_erf_grid",
]
