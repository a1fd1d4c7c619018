"""Any timm model as a Perceiver backbone: ``create_model("timm:convnext_atto")``.

Used to train peers (ConvNeXt, ResNet…) with exactly the same adapters, heads and recipes as UniRepLKNet, so
comparisons differ only in the backbone. timm is an optional dependency (``pip install 'uniperception[timm]'``).
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from ..errors import InvalidInputError, UnknownModelError

__all__ = ["TIMM_PREFIX", "TimmBackbone"]

#: Names starting with this prefix are built by timm.
TIMM_PREFIX = "timm:"


class TimmBackbone(nn.Module):
    """A timm model exposing the backbone contract (``forward_features`` → ``[B, C, H, W]``, ``num_features``).

    Args:
        model_name: a timm architecture name (``"convnext_atto"``, ``"resnet18"``).
        in_chans: input channels (an adapter's ``out_channels``).
        num_classes: classifier size; 0 keeps only the feature extractor.
        pretrained: passed to timm (needs its weights in the local hub cache when offline).
        **kwargs: further timm constructor arguments (``drop_path_rate``…).
    """

    def __init__(
        self, model_name: str, in_chans: int = 3, num_classes: int = 0, pretrained: bool = False, **kwargs: Any
    ) -> None:
        super().__init__()
        try:
            import timm
        except ImportError as e:  # pragma: no cover - exercised only without the extra
            raise ImportError("timm backbones need timm: pip install 'uniperception[timm]'") from e
        if not timm.is_model(model_name):
            raise UnknownModelError(f"timm has no model {model_name!r} (see timm.list_models())")
        kwargs.pop("deploy", None)  # Perceiver bundles record deploy=False for non-reparameterisable backbones
        self.model_name = model_name
        self.model = timm.create_model(
            model_name, pretrained=bool(pretrained), in_chans=in_chans, num_classes=num_classes, **kwargs
        )
        self.in_chans = in_chans
        self.num_features = int(self.model.num_features)
        self.num_classes = num_classes

    def forward_features(self, x: Tensor) -> Tensor:
        """``[B, in_chans, H, W]`` → the last feature map ``[B, num_features, h, w]``."""
        if x.ndim != 4 or x.shape[1] != self.in_chans:
            raise InvalidInputError(f"expected [B, {self.in_chans}, H, W], got {tuple(x.shape)}")
        return self.model.forward_features(x)

    def forward(self, x: Tensor) -> Tensor:
        """Logits (or pooled features when ``num_classes == 0``)."""
        return self.model.forward_head(self.forward_features(x))

    def remove_head(self) -> TimmBackbone:
        """Drop the classifier (the Perceiver's head replaces it)."""
        self.model.reset_classifier(0)
        self.num_classes = 0
        return self
