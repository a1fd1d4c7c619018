"""Task heads: classification (single/multi-view, single/multi-label) and forecasting."""

from .classification import ClassificationHead, ClassificationHeadConfig, classification_metrics
from .forecasting import ForecastHead, ForecastHeadConfig, forecast_metrics

__all__ = [
    "ClassificationHead",
    "ClassificationHeadConfig",
    "ForecastHead",
    "ForecastHeadConfig",
    "classification_metrics",
    "forecast_metrics",
]
