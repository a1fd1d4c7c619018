"""Fused pointwise kernels for inference on CPU (oneDNN post-ops), with exact eager fallbacks.

``linear_add_nchw`` does the same for a 1×1 convolution followed by a residual addition.

``linear_gelu_nchw`` applies a Linear's weight as a 1×1 convolution followed by the exact (erf) GELU. On a
CPU in inference (no autograd), float32, it runs as one oneDNN convolution with a GELU post-op, which saves
a full write and read of the widest tensor in a UniRepLKNet block (about 2× faster for that pair at
UniRepLKNet-A's shapes). Everywhere else (autograd, other dtypes or devices, tracing/export, or if the
private oneDNN op is unavailable in this PyTorch build) it runs the plain ``F.conv2d`` + ``F.gelu``.
"""

from __future__ import annotations

import functools
import logging

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["linear_add_nchw", "linear_gelu_nchw", "onednn_fusion_available"]

logger = logging.getLogger(__name__)


@functools.cache
def onednn_fusion_available() -> bool:
    """Whether this PyTorch exposes oneDNN's fused convolution op (``torch.ops.mkldnn._convolution_pointwise``)."""
    if not torch.backends.mkldnn.is_available():
        return False
    try:
        op = torch.ops.mkldnn._convolution_pointwise
        x = torch.randn(1, 2, 3, 3).contiguous(memory_format=torch.channels_last)
        w = torch.randn(4, 2, 1, 1)
        with torch.no_grad():
            out = op(x, w, None, [0, 0], [1, 1], [1, 1], 1, "gelu", [], "none")
        ok = torch.allclose(out, F.gelu(F.conv2d(x, w)), atol=1e-5, rtol=1e-5)
    except (AttributeError, RuntimeError, TypeError) as e:  # absent or changed private op
        logger.debug("oneDNN fused convolution unavailable: %s", e)
        return False
    return bool(ok)


@functools.cache
def _binary_fusion_available() -> bool:
    """Whether oneDNN's convolution with an ``add`` post-op is present and correct in this PyTorch."""
    if not onednn_fusion_available():
        return False
    try:
        x = torch.randn(1, 2, 3, 3).contiguous(memory_format=torch.channels_last)
        w, other = torch.randn(4, 2, 1, 1), torch.randn(1, 4, 3, 3).contiguous(memory_format=torch.channels_last)
        with torch.no_grad():
            out = torch.ops.mkldnn._convolution_pointwise.binary(
                x, other, w, None, [0, 0], [1, 1], [1, 1], 1, "add", None, None, [], None
            )
        return bool(torch.allclose(out, F.conv2d(x, w) + other, atol=1e-5, rtol=1e-5))
    except (AttributeError, RuntimeError, TypeError) as e:
        logger.debug("oneDNN convolution with a binary post-op unavailable: %s", e)
        return False


def _fusable(*tensors: Tensor) -> bool:
    """CPU float32 inference outside tracing, with oneDNN's fused op available."""
    return (
        all(t.device.type == "cpu" and t.dtype == torch.float32 for t in tensors)
        and not (torch.is_grad_enabled() and any(t.requires_grad for t in tensors))
        and not (torch.jit.is_tracing() or torch.jit.is_scripting() or torch.compiler.is_compiling())
        and onednn_fusion_available()
    )


def linear_gelu_nchw(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """``gelu(conv1x1(x, weight[:, :, None, None], bias))`` for a Linear ``weight`` [out, in] on NCHW ``x``."""
    w = weight[:, :, None, None]
    if _fusable(x, weight):
        return torch.ops.mkldnn._convolution_pointwise(
            x.contiguous(memory_format=torch.channels_last), w.contiguous(), bias,
            [0, 0], [1, 1], [1, 1], 1, "gelu", [], "none",
        )
    return F.gelu(F.conv2d(x, w, bias))


def linear_add_nchw(x: Tensor, weight: Tensor, bias: Tensor | None, other: Tensor) -> Tensor:
    """``other + conv1x1(x, weight[:, :, None, None], bias)``: a residual connection fused into the 1×1 conv.

    On CPU inference (float32) oneDNN adds ``other`` as the convolution's post-op while the output is still
    in cache, instead of a separate pass that reads both tensors and writes a third.
    """
    w = weight[:, :, None, None]
    if _fusable(x, weight, other) and other.shape == (x.shape[0], weight.shape[0], *x.shape[2:]) and (
        _binary_fusion_available()
    ):
        return _onednn_binary(
            x.contiguous(memory_format=torch.channels_last), other.contiguous(memory_format=torch.channels_last),
            w.contiguous(), bias, [0, 0], [1, 1], [1, 1], 1, "add", None, None, [], None,
        )
    return other + F.conv2d(x, w, bias)


def _onednn_binary(*args: object) -> Tensor:
    return torch.ops.mkldnn._convolution_pointwise.binary(*args)
