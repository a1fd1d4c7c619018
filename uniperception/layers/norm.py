"""Normalisation layers of the UniRepLKNet family.

``LayerNorm2d`` is the official "channels-first" LayerNorm (per-pixel statistics over channels) and
``GRN`` is ConvNeXt-V2's global response normalisation on channels-last tensors, with parameters shaped
``[1, 1, 1, C]`` exactly as the official checkpoints store them.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..ops.depthwise import _is_tracing

__all__ = ["GRN", "LayerNorm2d", "batch_norm_scaled"]


def batch_norm_scaled(bn: nn.Module, x: Tensor, scale: Tensor | None) -> Tensor:
    """``bn(x) * scale`` (``scale``: per-channel ``[C]``, or ``None`` for plain ``bn(x)``) as one BatchNorm.

    ``(x̂·w + b)·s = x̂·(w·s) + b·s``: the layer scale rides on the BatchNorm's affine parameters, so the product
    is not a separate pass over the activations in the forward, nor a product and a full-size reduction in the
    backward (autograd reaches ``w``, ``b`` and ``s`` through the two ``[C]`` products). Same batch statistics,
    running-stat update and ``num_batches_tracked`` as ``bn.forward``. Applies to a plain affine
    ``nn.BatchNorm2d`` without hooks; anything else (``SyncBatchNorm``, subclasses, hooked modules) runs
    ``bn(x) * scale`` as written.
    """
    if scale is None:
        return bn(x)
    if (
        type(bn) is not nn.BatchNorm2d or not bn.affine or x.dim() != 4
        or bn._forward_hooks or bn._forward_pre_hooks or torch.nn.modules.module._global_forward_hooks
        or torch.nn.modules.module._global_forward_pre_hooks
    ):
        return bn(x) * scale.view(1, -1, 1, 1)
    momentum = 0.0 if bn.momentum is None else bn.momentum
    if bn.training and bn.track_running_stats and bn.num_batches_tracked is not None:
        bn.num_batches_tracked.add_(1)
        if bn.momentum is None:  # cumulative moving average
            momentum = 1.0 / float(bn.num_batches_tracked)
    use_batch_stats = bn.training or (bn.running_mean is None and bn.running_var is None)
    track = not bn.training or bn.track_running_stats
    return F.batch_norm(
        x, bn.running_mean if track else None, bn.running_var if track else None,
        bn.weight * scale, bn.bias * scale, use_batch_stats, momentum, bn.eps,
    )


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


#: inference: squares are formed this many bytes of samples at a time, so they are summed while in cache
_SQUARES_CHUNK_BYTES = 4 << 20
_SQUARES_MAX_CHUNK = 8


def _spatial_sum_of_squares(x: Tensor, spatial: tuple[int, int]) -> Tensor:
    """``(x²).sum(spatial, keepdim=True)`` for NCHW (``spatial=(2, 3)``) or NHWC (``(1, 2)``) ``x``, fast on CPU."""
    chunked = _chunked_sum_of_squares(x if spatial == (2, 3) else x.permute(0, 3, 1, 2))
    if chunked is not None:
        return chunked[:, :, None, None] if spatial == (2, 3) else chunked[:, None, None, :]
    sq = x * x
    if spatial == (2, 3):
        return _spatial_sum(sq)[:, :, None, None]
    return _spatial_sum(sq.permute(0, 3, 1, 2))[:, None, None, :]


def _chunked_sum_of_squares(t: Tensor) -> Tensor | None:
    """``(t²).sum((2, 3))`` as ``[B, C]`` for a channels-innermost ``t``, a few samples at a time (inference only).

    Squaring the whole tensor first writes and re-reads a full-size temporary through memory; in chunks of
    about 4 MB the squares are summed (the ``ones @ t²`` GEMM) while still in cache: 8.3 → 3.6 ms for
    32×160×56², 3.2 → 1.5 ms for 32×320×28² (2-core AVX2 EPYC). ``None`` where it does not apply: autograd,
    tracing/export (the loop would fix the batch size), other layouts, maps too small to gain.
    """
    if t.dim() != 4 or (torch.is_grad_enabled() and t.requires_grad) or _is_tracing():
        return None
    return _chunked_sum_of_products(t, t)


def _chunked_sum_of_products(a: Tensor, b: Tensor) -> Tensor | None:
    """``(a·b).sum((2, 3))`` as ``[B, C]``, chunked as :func:`_chunked_sum_of_squares` (no autograd through it:
    for inference and the hand-written GRN backward). ``None`` where it does not apply."""
    if _is_tracing() or a.dim() != 4 or a.shape != b.shape:  # tracing first: touch no tensor attribute then
        return None
    bs, c, h, w = a.shape
    na, nb = a.permute(0, 2, 3, 1), b.permute(0, 2, 3, 1)
    chunk = max(1, _SQUARES_CHUNK_BYTES // max(1, h * w * c * a.element_size()))
    if not (na.is_contiguous() and nb.is_contiguous()) or chunk > _SQUARES_MAX_CHUNK or chunk >= bs:
        return None
    buf = a.new_empty(chunk, h * w, c)
    ones = a.new_ones(chunk, 1, h * w)
    out = a.new_empty(bs, 1, c)
    fa, fb = na.reshape(bs, h * w, c), nb.reshape(bs, h * w, c)
    for i in range(0, bs, chunk):
        n = min(chunk, bs - i)
        torch.mul(fa[i : i + n], fb[i : i + n], out=buf[:n])
        torch.matmul(ones[:n], buf[:n], out=out[i : i + n])
    return out.view(bs, c)


def _spatial_sum(t: Tensor) -> Tensor:
    """``t.sum((2, 3))`` of a ``B×C×H×W`` tensor, as ``[B, C]``.

    When the channels are innermost in memory (channels-last, or an NHWC tensor's NCHW view) the reduction over
    the outer spatial dims is done as a ``ones @ t`` GEMM: 3-5× faster than ``sum`` or ``torch.linalg.vector_norm``
    there (measured at UniRepLKNet's stage shapes on a 2-core x86 CPU).
    """
    b, c, h, w = t.shape
    nhwc = t.permute(0, 2, 3, 1)
    if nhwc.is_contiguous():
        return torch.matmul(t.new_ones(b, 1, h * w), nhwc.reshape(b, h * w, c)).view(b, c)
    return t.sum((2, 3))


class _GRNTrain(torch.autograd.Function):
    """GRN on ``B×C×H×W`` (any memory format) with a hand-written backward.

    Autograd's backward of the composed ops makes about twelve passes over the block's widest tensor (a
    square, an outer-product GEMM, several full-size products and sums); written out it needs one product
    ``g·x`` reduced per (sample, channel), one sum of ``g`` per channel and one fused ``g·scale + x·k``.
    The forward fuses ``x·scale + beta`` into one ``addcmul``.
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor, gamma: Tensor, beta: Tensor | None, eps: float) -> Tensor:
        b, c = x.shape[:2]
        ss = _chunked_sum_of_products(x, x)  # squares summed in cache, no full-size temporary
        buf = None
        if ss is None:
            buf = x * x  # reused for the output: one full-size allocation instead of two
            ss = _spatial_sum(buf)
        tiny = torch.finfo(ss.dtype).tiny
        gx = ss.clamp_min(tiny).sqrt()
        m = gx.mean(1, keepdim=True) + eps
        nx = gx / m
        g = gamma.reshape(1, c)
        scale = (1 + g * nx).view(b, c, 1, 1)
        if buf is None:
            buf = torch.empty_like(x)
        out = torch.mul(x, scale, out=buf) if beta is None else torch.addcmul(beta.reshape(1, c, 1, 1), x, scale, out=buf)
        ctx.save_for_backward(x, gamma, gx, m, nx, scale, ss > tiny)
        ctx.beta_shape = None if beta is None else beta.shape
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        x, gamma, gx, m, nx, scale, live = ctx.saved_tensors
        b, c = x.shape[:2]
        # the gradient in x's layout: elementwise ops on mixed layouts take PyTorch's slow strided loops
        cl = x.is_contiguous(memory_format=torch.channels_last)
        grad = grad.contiguous(memory_format=torch.channels_last if cl else torch.contiguous_format)
        buf = grad * x
        r = _spatial_sum(buf)  # dL/dscale, [B, C]
        g = gamma.reshape(1, c)
        dgamma = (r * nx).sum(0).view_as(gamma)
        dbeta = None if ctx.beta_shape is None else _spatial_sum(grad).sum(0).view(ctx.beta_shape)
        dnx = r * g
        dgx = dnx / m - (dnx * gx).sum(1, keepdim=True) / (c * m * m)
        dss = torch.where(live, dgx * 0.5 / gx, torch.zeros_like(dgx))
        dx = torch.mul(grad, scale, out=buf).addcmul_(x, (2 * dss).view(b, c, 1, 1))  # buf reused: no new tensor
        return dx, dgamma, dbeta, None


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
        """GRN on an NHWC tensor (the official layout)."""
        return self._grn(x, spatial=(1, 2), channel=-1, shape=(1, 1, 1, -1))

    def forward_channels_first(self, x: Tensor, inplace: bool = False) -> Tensor:
        """GRN on an NCHW tensor (any memory format): the same maths over dims (2, 3) / 1.

        ``inplace=True`` (inference only, for a temporary ``x`` nobody else reads) scales ``x`` in place.
        """
        return self._grn(x, spatial=(2, 3), channel=1, shape=(1, -1, 1, 1), inplace=inplace)

    def _grn(
        self, x: Tensor, spatial: tuple[int, int], channel: int, shape: tuple[int, ...], inplace: bool = False
    ) -> Tensor:
        if (
            torch.is_grad_enabled() and x.dim() == 4
            and (x.requires_grad or self.gamma.requires_grad or (self.beta is not None and self.beta.requires_grad))
            and not _is_tracing()
        ):
            # training: the hand-written backward (same values); NHWC input runs as its NCHW-shaped view
            xc = x if spatial == (2, 3) else x.permute(0, 3, 1, 2)
            out = _GRNTrain.apply(xc, self.gamma, self.beta, self.eps)
            return out if spatial == (2, 3) else out.permute(0, 2, 3, 1)
        # clamp: a channel that is exactly zero everywhere (GELU underflow on small late-stage maps) would give
        # sqrt'(0) = inf and a NaN gradient; torch.norm's sub-gradient is 0 there, and so is clamp's.
        ss = _spatial_sum_of_squares(x, spatial)
        gx = ss.clamp_min(torch.finfo(ss.dtype).tiny).sqrt()
        nx = gx / (gx.mean(dim=channel, keepdim=True) + self.eps)
        scale = torch.addcmul(torch.ones_like(nx), self.gamma.view(shape), nx)
        out = x.mul_(scale) if inplace else x * scale
        return out if self.beta is None else out.add_(self.beta.view(shape))
