"""Task heads: classification (single/multi-view, single/multi-label) and forecasting."""

from .classification import ClassificationHead, ClassificationHeadConfig, classification_metrics

__all__ = ["ClassificationHead", "ClassificationHeadConfig", "classification_metrics"]
