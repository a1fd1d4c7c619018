"""Normalisation layers of the UniRepLKNet family.

``LayerNorm2d`` is the official "channels-first" LayerNorm (per-pixel statistics over channels) and
``GRN`` is ConvNeXt-V2's global response normalisation on channels-last tensors, with parameters shaped
``[1, 1, 1, C]`` exactly as the official checkpoints store them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["GRN", "LayerNorm2d"]


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channel axis of an NCHW tensor (eps 1e-6, as the official code).

    Uses ``F.layer_norm`` on the channels-last view, which equals the official explicit mean/variance
    formula up to float rounding and is faster.
    """

    def __init__(self, num_channels: int, eps: float = 1e-6) -> None:
        super().__init__(num_channels, eps=eps)

    def forward(self, x: Tensor) -> Tensor:
        x = x.permute(0, 2, 3, 1)
        x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


class GRN(nn.Module):
    """Global Response Normalisation on NHWC input: ``(gamma·N(x) + 1)·x + beta``.

    ``N(x) = G / (mean_c G + 1e-6)`` with ``G`` the spatial L2 norm per sample and channel. ``beta`` is
    absent when ``use_bias=False`` (the deploy form, where it is folded into the next Linear).
    """

    def __init__(self, dim: int, use_bias: bool = True, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.gamma = nn.Parameter(torch.zeros(1, 1, 1, dim))
        self.beta: nn.Parameter | None = nn.Parameter(torch.zeros(1, 1, 1, dim)) if use_bias else None

    @property
    def use_bias(self) -> bool:
        """Whether this GRN still carries its additive ``beta`` (training form)."""
        return self.beta is not None

    def forward(self, x: Tensor) -> Tensor:
        gx = torch.linalg.vector_norm(x, ord=2, dim=(1, 2), keepdim=True)
        nx = gx / (gx.mean(dim=-1, keepdim=True) + self.eps)
        out = torch.addcmul(x, x, self.gamma * nx)
        return out if self.beta is None else out + self.beta
