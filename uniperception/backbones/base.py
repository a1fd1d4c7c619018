"""What every backbone shares: the timm-style classifier API, input checks and layout.

A backbone subclass builds its layers, sets ``in_chans``, ``num_features``, ``num_classes``,
``features_only``, ``channels_last`` and ``init_kwargs``, owns ``norm`` (pooled LayerNorm) and ``head``
(classifier) unless ``features_only``, and implements ``forward_features`` / ``forward_stages`` /
``is_deploy`` / ``reparameterize``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from ..errors import InvalidInputError
from ..ops import set_conv_impl
from ..ops.depthwise import channels_last_grad

__all__ = ["Backbone", "channels_last_grad", "trunc_normal_init"]


def trunc_normal_init(m: nn.Module) -> None:
    """timm's init of the ConvNeXt family: conv/linear weights ~ trunc_normal(std 0.02), biases 0."""
    if isinstance(m, (nn.Conv2d, nn.Linear)):
        nn.init.trunc_normal_(m.weight, std=0.02, a=-2.0, b=2.0)
        if m.bias is not None:
            nn.init.zeros_(m.bias)


class Backbone(nn.Module):
    """Base class of the image-shaped backbones (UniRepLKNet, RepLKNet, SLaK)."""

    # its reparameterize() walks its blocks (see uniperception.layers.reparam.reparameterize)
    _reparameterize_walks_children = True

    in_chans: int
    num_features: int
    num_classes: int
    features_only: bool
    out_indices: tuple[int, ...]
    channels_last: bool
    init_kwargs: dict[str, Any]

    def _check_input(self, x: Tensor, min_side: int = 1) -> None:
        """Clear errors for wrong ranks, channel counts and (when the network needs it) too-small inputs."""
        if torch.jit.is_tracing() or torch.compiler.is_compiling():
            return
        name = type(self).__name__
        if x.dim() != 4:
            raise InvalidInputError(f"{name} expects a 4-D tensor B×{self.in_chans}×H×W, got shape {tuple(x.shape)}")
        if x.shape[1] != self.in_chans:
            raise InvalidInputError(
                f"{name} was built with in_chans={self.in_chans} but the input has {x.shape[1]} channels; "
                "build it with the right in_chans"
            )
        if min(x.shape[-2:]) < min_side:
            raise InvalidInputError(
                f"{name} needs inputs of at least {min_side}×{min_side} here, got {tuple(x.shape[-2:])} "
                "(resize or pad it)"
            )

    def _to_layout(self, x: Tensor) -> Tensor:
        # channels-last end to end: depthwise and 1×1 convs run on it directly, permutes to NHWC are free
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    # ----------------------------------------------------------------------------------------- forward
    # Defaults for the ConvNeXt layout (``downsample_layers[i]`` then ``stages[i]``, features normalised by
    # ``norm{i}``): UniRepLKNet and SLaK use them as they are; RepLKNet overrides the stage walk.
    def min_input_side(self, last_stage: int) -> int:
        """Smallest input side the network accepts when it runs up to ``last_stage``."""
        return 1

    def forward_stages(self, x: Tensor) -> list[Tensor]:
        """Stage outputs (before any norm) up to the last stage ``out_indices`` needs."""
        last = max(self.out_indices)
        self._check_input(x, self.min_input_side(last))
        x = self._to_layout(x)
        outs = []
        for i in range(last + 1):
            x = self._stage_out(self.stages[i](self.downsample_layers[i](x)))
            outs.append(x)
        return outs

    def forward_features(self, x: Tensor) -> Tensor:
        """The final feature map (stride 32), before pooling."""
        last = len(self.stages) - 1
        self._check_input(x, self.min_input_side(last))
        x = self._to_layout(x)
        for i in range(last + 1):
            x = self._stage_out(self.stages[i](self.downsample_layers[i](x)))
        return x

    def _stage_out(self, x: Tensor) -> Tensor:
        # keep the backward channels-last too: see channels_last_grad
        return channels_last_grad(x) if self.channels_last else x

    def feature_norm(self, i: int) -> nn.Module:
        """The norm applied to stage ``i``'s map in ``features_only`` mode (official ``norm{i}``)."""
        return getattr(self, f"norm{i}")

    def forward(self, x: Tensor) -> Tensor | list[Tensor]:
        if self.features_only:
            outs = self.forward_stages(x)
            return [self.feature_norm(i)(outs[i]) for i in self.out_indices]
        return self.forward_head(self.forward_features(x))

    def pool_and_norm(self, x: Tensor) -> Tensor:
        """Final map → the pooled, normalised feature (global mean then ``norm``; RepLKNet norms first)."""
        return self.norm(x.mean((-2, -1)))

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        """Pool and normalise the final map, then classify; ``pre_logits=True`` stops before the Linear."""
        if self.features_only:
            raise InvalidInputError("a features_only model has no head")
        x = self.pool_and_norm(x)
        return x if pre_logits else self.head(x)

    def get_classifier(self) -> nn.Module:
        """The classification layer (``nn.Identity`` when ``num_classes == 0``)."""
        if self.features_only:
            raise InvalidInputError("a features_only model has no classifier")
        return self.head

    #: how a new classifier is initialised: "trunc_normal" (ConvNeXt family) or "default" (PyTorch's)
    head_init: str = "trunc_normal"

    def _init_head(self, head: nn.Linear) -> None:
        if self.head_init == "trunc_normal":
            trunc_normal_init(head)

    def _build_classifier(self, width: int, num_classes: int, head_init_scale: float = 1.0) -> None:
        """Pooled LayerNorm + Linear head, every conv/linear trunc-normal initialised, head scaled."""
        self.norm = nn.LayerNorm(width, eps=1e-6)
        self.head = nn.Linear(width, num_classes) if num_classes > 0 else nn.Identity()
        self.apply(trunc_normal_init)
        if isinstance(self.head, nn.Linear):
            with torch.no_grad():
                self.head.weight.mul_(head_init_scale)
                self.head.bias.mul_(head_init_scale)

    def reset_classifier(self, num_classes: int) -> None:
        """Replace the head with a freshly initialised one of ``num_classes`` outputs (0 = none)."""
        if self.features_only:
            raise InvalidInputError("a features_only model has no classifier")
        self.num_classes = num_classes
        ref = next(self.parameters())
        if num_classes > 0:
            head = nn.Linear(self.num_features, num_classes, device=ref.device, dtype=ref.dtype)
            self._init_head(head)
            self.head = head
        else:
            self.head = nn.Identity()
        self.init_kwargs["num_classes"] = num_classes

    def remove_head(self) -> Backbone:
        """Drop the pooled LayerNorm and the classifier, for use under an external head (e.g. a Perceiver's)."""
        if not self.features_only:
            self.norm = nn.Identity()
            self.head = nn.Identity()
            self.num_classes = 0
            self.init_kwargs["num_classes"] = 0
        return self

    def set_conv_impl(self, impl: str = "auto") -> Backbone:
        """Run every large-kernel depthwise conv with ``impl`` (``"auto"``, ``"native"``, ``"fft"``, …)."""
        set_conv_impl(self, impl)
        return self
