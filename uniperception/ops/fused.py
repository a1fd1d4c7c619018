"""Fused pointwise kernels for inference on CPU (oneDNN post-ops), with exact eager fallbacks.

``linear_gelu_nchw`` applies a Linear's weight as a 1×1 convolution followed by the exact (erf) GELU. On a
CPU in inference (no autograd), float32, it runs as one oneDNN convolution with a GELU post-op, which saves
a full write and read of the widest tensor in a UniRepLKNet block (about 2× faster for that pair at
UniRepLKNet-A's shapes). Everywhere else (autograd, other dtypes or devices, tracing/export, or if the
private oneDNN op is unavailable in this PyTorch build) it runs the plain ``F.conv2d`` + ``F.gelu``.

``conv1x1`` is that 1×1 convolution for training: on a CPU its bias gradient is a plain sum of the output
gradient instead of the one PyTorch's convolution backward computes (several times slower at these shapes).
"""

from __future__ import annotations

import functools
import logging
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from .depthwise import _is_tracing

__all__ = ["conv1x1", "conv1x1_add_", "linear_gelu_nchw", "onednn_fusion_available"]

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


def linear_gelu_nchw(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """``gelu(conv1x1(x, weight[:, :, None, None], bias))`` for a Linear ``weight`` [out, in] on NCHW ``x``."""
    w = weight[:, :, None, None]
    fusable = (
        x.device.type == "cpu"
        and x.dtype == torch.float32
        and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))
        and not _is_tracing()
        and onednn_fusion_available()
    )
    if fusable:
        return torch.ops.mkldnn._convolution_pointwise(
            x.contiguous(memory_format=torch.channels_last), w.contiguous(), bias,
            [0, 0], [1, 1], [1, 1], 1, "gelu", [], "none",
        )
    return F.gelu(conv1x1(x, w, bias))


class _Conv1x1(torch.autograd.Function):
    """``F.conv2d(x, w, b)`` for a 1×1 ``w`` whose bias gradient is ``dy.sum((0, 2, 3))``.

    PyTorch's CPU convolution backward computes the bias gradient of a 1×1 conv far slower than a sum: at
    UniRepLKNet-A's first-stage ``pwconv1`` (32×40×56² → 160 channels, channels-last) it adds 14 ms to a 30 ms
    backward, where the sum takes 4 ms (2-core AVX2 EPYC, ``benchmarks/lk_conv.py``'s machine). The input and
    weight gradients are the same ``convolution_backward`` call autograd makes, without the bias; the backward is
    made of differentiable ops, so double backward works.
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor, w: Tensor, b: Tensor) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(x, w)
        return F.conv2d(x, w, b)

    @staticmethod
    def backward(ctx: Any, gy: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        x, w = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad
        gx = gw = gb = None
        if need_x or need_w:
            gx, gw, _ = torch.ops.aten.convolution_backward(
                gy, x, w, None, [1, 1], [0, 0], [1, 1], False, [0, 0], 1, [need_x, need_w, False]
            )
        if need_b:
            gb = gy.sum((0, 2, 3))
        return gx, gw, gb


def conv1x1(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """``F.conv2d(x, weight, bias)`` for a 1×1 ``weight`` [out, in, 1, 1], with a cheap bias gradient on CPU.

    The custom backward is used only where it helps: CPU, autograd recording a bias that needs a gradient, no
    autocast, not tracing or compiling. Everywhere else this is ``F.conv2d`` itself.
    """
    if (
        bias is not None and x.device.type == "cpu" and torch.is_grad_enabled() and bias.requires_grad
        and x.dim() == 4 and not torch.is_autocast_enabled("cpu") and not _is_tracing()
    ):
        return _Conv1x1.apply(x, weight, bias)
    return F.conv2d(x, weight, bias)


@functools.cache
def _onednn_add_fusion_available() -> bool:
    """Whether oneDNN's in-place convolution + sum op (``mkldnn._convolution_pointwise_.binary``) works here."""
    if not onednn_fusion_available():
        return False
    try:
        x = torch.randn(2, 3, 4, 4).contiguous(memory_format=torch.channels_last)
        w, b = torch.randn(5, 3, 1, 1), torch.randn(5)
        acc = torch.randn(2, 5, 4, 4).contiguous(memory_format=torch.channels_last)
        want = acc + F.conv2d(x, w, b)
        with torch.no_grad():
            torch.ops.mkldnn._convolution_pointwise_(acc, x, w, b, [0, 0], [1, 1], [1, 1], 1, "add", None, None, [], None)
        ok = torch.allclose(acc, want, atol=1e-5, rtol=1e-5)
    except (AttributeError, RuntimeError, TypeError) as e:
        logger.debug("oneDNN fused convolution + add unavailable: %s", e)
        return False
    return bool(ok)


def conv1x1_add_(out: Tensor, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """``out += conv1x1(x, weight[:, :, None, None], bias)`` in place, for a Linear ``weight`` [out, in].

    Inference on CPU (float32, channels-last ``out`` and ``x``) runs it as one oneDNN convolution with a sum
    post-op, so the conv's result is never written on its own; elsewhere it is ``out.add_(F.conv2d(...))``.
    """
    w = weight[:, :, None, None]
    fusable = (
        x.device.type == "cpu" and x.dtype == torch.float32 == out.dtype
        and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad or out.requires_grad))
        and not _is_tracing()
        and x.is_contiguous(memory_format=torch.channels_last) and out.is_contiguous(memory_format=torch.channels_last)
        and _onednn_add_fusion_available()
    )
    if fusable:
        return torch.ops.mkldnn._convolution_pointwise_(
            out, x, w.contiguous(), bias, [0, 0], [1, 1], [1, 1], 1, "add", None, None, [], None
        )
    return out.add_(F.conv2d(x, w, bias))
