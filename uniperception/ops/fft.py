"""Depthwise convolution through real 2-D FFTs: cost independent of the kernel size.

``y = x ⋆ w`` (PyTorch's cross-correlation, stride 1) is computed as the valid part of a circular
convolution of the zero-padded input with the flipped kernel, on an FFT grid no smaller than the padded
input (so nothing that matters wraps around). Gradients flow through ``torch.fft`` (themselves FFTs), so
training also costs ``O(HW log HW)`` per channel instead of ``O(HW k²)``. Work is chunked over the batch so
the complex intermediates stay bounded at large batch. bfloat16/float16 run in float32 (``torch.fft``
rejects bfloat16 on CPU) and are cast back.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["fft_depthwise_conv2d", "fft_size"]

#: complex elements (per chunk) above which the batch is processed in chunks
_CHUNK_ELEMENTS = 1 << 24


@functools.lru_cache(maxsize=1024)
def fft_size(n: int) -> int:
    """The FFT length to use for ``n`` samples: the cheapest 2^a·3^b·5^c in ``[n, 2n]``.

    Measured on PyTorch's CPU FFT (oneMKL; rfft2 + irfft2 per element, 2-core AVX2 EPYC): lengths with a
    factor 7 are 1.3-1.5× slower than the next 5-smooth one (35² 16.8 ms vs 36² 12.5 ms for 2560 planes), and odd
    lengths ~1.8× slower per element than even ones (15: 8.3, 25: 7.0, 27: 5.6, 45: 5.0 ns against 2.5-3.8 for
    16-96 even), so e.g. 13 → 16 (not 15), 27 → 30, 43 → 48, 81 → 90. Cost model: ``S²``, ×1.8 when ``S`` is odd.
    """
    if n <= 2:
        return max(1, n)
    best, best_cost = 0, float("inf")
    p5 = 1
    while p5 <= 2 * n:
        p3 = p5
        while p3 <= 2 * n:
            p2 = p3
            while p2 < n:
                p2 *= 2
            if p2 <= 2 * n:
                cost = p2 * p2 * (1.8 if p2 % 2 else 1.0)
                if cost < best_cost or (cost == best_cost and p2 < best):
                    best, best_cost = p2, cost
            p3 *= 3
        p5 *= 5
    return best


@functools.lru_cache(maxsize=1024)
def smooth7_size(n: int) -> int:
    """The smallest 2^a·3^b·5^c·7^d ≥ n: the FFT grid rule the CPU cost profiles' FFT constants were fitted
    on (kept for the cost model's estimates, so its choices stay the measured ones)."""
    best = 1 << max(0, (n - 1).bit_length())
    p7 = 1
    while p7 < best:
        p5 = p7
        while p5 < best:
            p3 = p5
            while p3 < best:
                p2 = p3
                while p2 < n:
                    p2 *= 2
                best = min(best, p2)
                p3 *= 3
            p5 *= 5
        p7 *= 7
    return best


def _fft_conv(x: Tensor, kernel_f: Tensor, bias: Tensor | None, s: tuple[int, int], off: tuple[int, int],
              out_hw: tuple[int, int]) -> Tensor:
    xf = torch.fft.rfft2(x, s=s)
    y = torch.fft.irfft2(xf * kernel_f, s=s)
    y = y[..., off[0] : off[0] + out_hw[0], off[1] : off[1] + out_hw[1]]
    if bias is not None:
        y = y + bias.view(1, -1, 1, 1)
    return y


def fft_depthwise_conv2d(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    padding: tuple[int, int] = (0, 0),
    dilation: tuple[int, int] = (1, 1),
) -> Tensor:
    """Stride-1 depthwise ``conv2d`` (``groups = channels``, weight ``[C, 1, kh, kw]``) by FFT.

    Equals ``F.conv2d(x, weight, bias, padding=padding, dilation=dilation, groups=C)`` up to float rounding;
    differentiable in ``x``, ``weight`` and ``bias``.
    """
    out_dtype = x.dtype
    work = torch.float64 if x.dtype == torch.float64 else torch.float32
    x, weight = x.to(work), weight.to(work)
    bias = bias.to(work) if bias is not None else None
    dh, dw = dilation
    if dh != 1 or dw != 1:
        kh, kw = weight.shape[-2:]
        dense = weight.new_zeros((*weight.shape[:-2], dh * (kh - 1) + 1, dw * (kw - 1) + 1))
        dense[..., ::dh, ::dw] = weight
        weight = dense
    ph, pw = padding
    kh, kw = weight.shape[-2:]
    b, c, h, w = x.shape
    hp, wp = h + 2 * ph, w + 2 * pw
    out_hw = (hp - kh + 1, wp - kw + 1)
    if out_hw[0] <= 0 or out_hw[1] <= 0:
        raise ValueError(f"kernel {kh}x{kw} larger than the padded input {hp}x{wp}")
    # Output (i, j) is element (i + kh-1-ph, j + kw-1-pw) of the linear convolution of the *unpadded*
    # input with the flipped kernel, so the zero padding comes free with the FFT grid. A grid of
    # h + ph (and at least kh) keeps every needed element clear of circular wrap-around.
    off = (kh - 1 - ph, kw - 1 - pw)
    if off[0] < 0 or off[1] < 0:  # padding beyond the kernel's reach: pad explicitly, then no padding
        x = F.pad(x, (pw, pw, ph, ph))
        return fft_depthwise_conv2d(x, weight, bias, (0, 0), (1, 1)).to(out_dtype)
    s = (fft_size(max(h + ph, kh)), fft_size(max(w + pw, kw)))
    kernel_f = torch.fft.rfft2(weight.flip(-2, -1).squeeze(1), s=s)
    per_sample = c * s[0] * (s[1] // 2 + 1)
    chunk = max(1, _CHUNK_ELEMENTS // max(per_sample, 1))
    if b <= chunk:
        y = _fft_conv(x, kernel_f, bias, s, off, out_hw)
    else:
        y = torch.cat([_fft_conv(xc, kernel_f, bias, s, off, out_hw) for xc in x.split(chunk)])
    return y.to(out_dtype)
