"""Classification head: pool → (view pooling) → LayerNorm → Linear, with its loss and metrics.

Single-view inputs reproduce the UniRepLKNet classifier exactly (global mean → LayerNorm(eps 1e-6) →
Linear), so an official ImageNet head loads into it. Multi-view inputs (the point-cloud projection)
arrive as ``B·V`` maps; ``view_pool="concat"`` is the official point-cloud head (concatenate the ``V``
pooled features → LayerNorm(V·C) → Linear), ``"mean"`` averages the views (view-count agnostic).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import InvalidInputError

__all__ = ["ClassificationHead", "ClassificationHeadConfig", "classification_metrics"]


@dataclasses.dataclass
class ClassificationHeadConfig:
    """Configuration of :class:`ClassificationHead` (saved in bundles)."""

    in_features: int
    num_classes: int
    views: int = 1
    view_pool: str = "concat"
    multi_label: bool = False
    label_smoothing: float = 0.0
    drop_rate: float = 0.0


class ClassificationHead(nn.Module):
    """Pool the backbone's final map and classify it (see the module docstring)."""

    def __init__(self, config: ClassificationHeadConfig) -> None:
        super().__init__()
        if config.view_pool not in ("concat", "mean"):
            raise InvalidInputError(f"view_pool must be 'concat' or 'mean', got {config.view_pool!r}")
        self.config = config
        width = config.in_features * (config.views if config.view_pool == "concat" else 1)
        self.norm = nn.LayerNorm(width, eps=1e-6)
        self.drop = nn.Dropout(config.drop_rate)
        self.fc = nn.Linear(width, config.num_classes)
        nn.init.trunc_normal_(self.fc.weight, std=0.02)
        nn.init.zeros_(self.fc.bias)

    def pre_logits(self, feature_map: Tensor) -> Tensor:
        """``[B·V, C, h, w]`` → the normalised pooled feature ``[B, width]`` (the embedding of a sample)."""
        pooled = feature_map.mean((-2, -1))
        v = self.config.views
        if v > 1:
            if pooled.shape[0] % v:
                raise InvalidInputError(f"batch of {pooled.shape[0]} maps is not a multiple of {v} views")
            pooled = pooled.view(-1, v, pooled.shape[-1])
            pooled = pooled.flatten(1) if self.config.view_pool == "concat" else pooled.mean(1)
        return self.norm(pooled)

    def forward(self, feature_map: Tensor) -> Tensor:
        return self.fc(self.drop(self.pre_logits(feature_map)))

    def loss(self, logits: Tensor, target: Tensor) -> Tensor:
        """Cross-entropy (index or soft targets, optional label smoothing) or BCE for multi-label."""
        if self.config.multi_label:
            return F.binary_cross_entropy_with_logits(logits, target.float())
        return F.cross_entropy(logits, target, label_smoothing=self.config.label_smoothing)

    def probabilities(self, logits: Tensor) -> Tensor:
        """Scores the predictions report: softmax, or per-class sigmoid for multi-label."""
        return torch.sigmoid(logits) if self.config.multi_label else logits.softmax(-1)

    def metrics(self, logits: Tensor, target: Tensor) -> dict[str, float]:
        """Accuracy (top-1, top-5) or, for multi-label, exact-match and per-label accuracy."""
        return classification_metrics(logits, target, self.config.multi_label)


def classification_metrics(logits: Tensor, target: Tensor, multi_label: bool = False) -> dict[str, float]:
    """Top-1/top-5 accuracy for index targets; subset and label accuracy for multi-label 0/1 targets."""
    if logits.numel() == 0:
        return {}
    if multi_label:
        pred = logits > 0
        tgt = target > 0.5
        return {"subset_acc": (pred == tgt).all(-1).float().mean().item(), "label_acc": (pred == tgt).float().mean().item()}
    if target.dim() > 1:  # soft targets (mixup): compare with the arg-max class
        target = target.argmax(-1)
    k = min(5, logits.shape[-1])
    topk = logits.topk(k, dim=-1).indices
    out: dict[str, Any] = {"acc1": (topk[:, 0] == target).float().mean().item()}
    if k >= 5:
        out["acc5"] = (topk == target[:, None]).any(-1).float().mean().item()
    return out
