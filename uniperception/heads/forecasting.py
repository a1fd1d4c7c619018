"""Forecasting head: the backbone's pooled features → ``horizon × variables``, plus a linear skip.

The features of the folded lookback image are pooled, normalised and mapped to the whole forecast; a
linear map of the (instance-normalised) lookback window onto the horizon, shared across variables, is added
(NLinear's well-known strong baseline), so the backbone learns what a linear extrapolation misses. Outputs
live in the window's normalised units; the adapter's statistics map them back.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["ForecastHead", "ForecastHeadConfig", "forecast_metrics"]


@dataclasses.dataclass
class ForecastHeadConfig:
    """Configuration of :class:`ForecastHead` (saved in bundles)."""

    in_features: int
    horizon: int
    num_variables: int
    lookback: int
    linear_skip: bool = True


class ForecastHead(nn.Module):
    """Pooled features (+ linear skip over the window) → ``[B, horizon, num_variables]``."""

    def __init__(self, config: ForecastHeadConfig) -> None:
        super().__init__()
        self.config = config
        self.norm = nn.LayerNorm(config.in_features, eps=1e-6)
        self.fc = nn.Linear(config.in_features, config.horizon * config.num_variables)
        nn.init.zeros_(self.fc.weight)  # start from the linear skip's forecast
        nn.init.zeros_(self.fc.bias)
        self.skip = nn.Linear(config.lookback, config.horizon) if config.linear_skip else None

    def forward(self, feature_map: Tensor, window: Tensor) -> Tensor:
        cfg = self.config
        b = feature_map.shape[0]
        out = self.fc(self.norm(feature_map.mean((-2, -1)))).view(b, cfg.horizon, cfg.num_variables)
        if self.skip is not None:
            values = window[..., : cfg.num_variables]  # [B, lookback, N]
            out = out + self.skip(values.transpose(1, 2)).transpose(1, 2)
        return out

    def loss(self, pred: Tensor, target: Tensor) -> Tensor:
        """Mean squared error in normalised units."""
        return F.mse_loss(pred, target)

    def metrics(self, pred: Tensor, target: Tensor) -> dict[str, float]:
        """MSE and MAE in normalised units."""
        return forecast_metrics(pred, target)


def forecast_metrics(pred: Tensor, target: Tensor) -> dict[str, float]:
    """``{"mse", "mae"}`` of a forecast."""
    with torch.no_grad():
        return {"mse": F.mse_loss(pred, target).item(), "mae": (pred - target).abs().mean().item()}
