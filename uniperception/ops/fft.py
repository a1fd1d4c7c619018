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
import os
import threading
import weakref

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["clear_fft_kernel_cache", "fft_depthwise_conv2d", "fft_size", "set_fft_kernel_cache"]

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


def _fft_conv(x: Tensor, kernel_f: Tensor, s: tuple[int, int], off: tuple[int, int],
              out_hw: tuple[int, int], inference: bool) -> Tensor:
    """The valid ``out_hw`` window (at ``off``) of ``x`` circularly convolved with ``kernel_f`` on grid ``s``.

    In inference the inverse transform is pruned: of the inverse FFT along H only the ``out_hw[0]`` rows
    that are kept go through the (real) inverse along W, 10-20% less than a full ``irfft2`` at the
    UniRepLKNet stage shapes (same values: ``irfft2`` is exactly these two 1-D transforms). In training the
    backward of the pruned form measured 2-8% slower than the full ``irfft2``'s, so training keeps that.
    """
    xf = torch.fft.rfft2(x, s=s)
    if not inference:
        y = torch.fft.irfft2(xf * kernel_f, s=s)
        return y[..., off[0] : off[0] + out_hw[0], off[1] : off[1] + out_hw[1]]
    rows = torch.fft.ifft(xf.mul_(kernel_f), dim=-2)[..., off[0] : off[0] + out_hw[0], :]
    return torch.fft.irfft(rows, n=s[1], dim=-1)[..., off[1] : off[1] + out_hw[1]]


# ------------------------------------------------------------------------------------ kernel spectra
# In inference the kernel of a layer is the same call after call; its FFT costs as much as the input's at
# batch 1 (80@28², 31×31: 0.31 of 1.4 ms), so spectra of parameters are kept, per parameter and FFT grid.
# An entry is valid while the parameter's storage, version counter and a fingerprint of the kernel's values
# are unchanged: the fingerprint also catches writes through ``param.data``, which bypass the version counter.
# Keyed by the parameter's id (tensors compare elementwise, so no WeakKeyDictionary); a weak reference's
# callback drops the entry with the parameter.
_KERNEL_CACHE: dict[int, tuple[weakref.ref, dict[tuple, tuple]]] = {}
_KERNEL_CACHE_STATE = {"enabled": os.environ.get("UNIPERCEPTION_FFT_KERNEL_CACHE", "1") != "0"}
#: FFT grids (input sizes) remembered per parameter
_KERNEL_CACHE_PER_PARAM = 8
#: guards the cache's dicts: inference may run in several threads (a server's thread pool) at once; re-entrant
#: because a collection inside a locked region may run a dead parameter's callback (which takes it) at once
_KERNEL_CACHE_LOCK = threading.RLock()


def set_fft_kernel_cache(enabled: bool = True) -> None:
    """Keep (default) or stop keeping inference kernel spectra (``UNIPERCEPTION_FFT_KERNEL_CACHE=0`` turns
    it off at start-up); turning it off drops what is kept."""
    _KERNEL_CACHE_STATE["enabled"] = bool(enabled)
    if not enabled:
        clear_fft_kernel_cache()


def clear_fft_kernel_cache() -> None:
    """Drop every kept kernel spectrum (they are also dropped with their parameters)."""
    with _KERNEL_CACHE_LOCK:
        _KERNEL_CACHE.clear()


@functools.lru_cache(maxsize=64)
def _probe(n: int, dtype: torch.dtype) -> Tensor:
    g = torch.Generator().manual_seed(n)
    return torch.rand(n, generator=g, dtype=torch.float64).add_(0.5).to(dtype)


def _fingerprint(w: Tensor) -> float:
    """A dot product of the kernel's values with a fixed random vector: any realistic change moves it."""
    flat = w.detach().reshape(-1)
    return float(torch.dot(flat, _probe(flat.numel(), flat.dtype).to(flat.device)))


def _spectrum(weight: Tensor, s: tuple[int, int]) -> Tensor:
    return torch.fft.rfft2(weight.flip(-2, -1).squeeze(1), s=s)


def _kernel_spectrum(weight: Tensor, work: torch.dtype, dilation: tuple[int, int], s: tuple[int, int]) -> Tensor:
    """The rfft2 of the flipped (densified) kernel on grid ``s``; kept for parameters in inference."""
    root = weight._base if weight._base is not None else weight
    # only with grad mode off: a spectrum made under inference_mode is an inference tensor, which autograd
    # may not save (a frozen kernel in a graph that needs the input's gradient would then fail)
    cacheable = (
        _KERNEL_CACHE_STATE["enabled"] and not torch.is_grad_enabled() and isinstance(root, torch.nn.Parameter)
    )
    if not cacheable:
        return _spectrum(densify_kernel(weight.to(work), dilation), s)
    key = (weight.storage_offset(), tuple(weight.shape), weight.stride(), weight.dtype, weight.device, work,
           dilation, s)
    stamp = (root.data_ptr(), root._version, _fingerprint(weight))
    rid = id(root)
    with _KERNEL_CACHE_LOCK:
        slot = _KERNEL_CACHE.get(rid)
        hit = slot[1].get(key) if slot is not None and slot[0]() is root else None
    if hit is not None and hit[0] == stamp:
        return hit[1]
    spec = _spectrum(densify_kernel(weight.to(work), dilation), s)  # outside the lock: threads overlap
    with _KERNEL_CACHE_LOCK:
        slot = _KERNEL_CACHE.get(rid)
        if slot is None or slot[0]() is not root:
            slot = (weakref.ref(root, lambda _ref: _drop_entry(rid)), {})
            _KERNEL_CACHE[rid] = slot
        entries = slot[1]
        entries.pop(key, None)
        while len(entries) >= _KERNEL_CACHE_PER_PARAM:
            entries.pop(next(iter(entries)))
        entries[key] = (stamp, spec)
    return spec


def _drop_entry(rid: int) -> None:
    """The weak reference's callback: the parameter is gone (may run in any thread, at collection time)."""
    with _KERNEL_CACHE_LOCK:
        _KERNEL_CACHE.pop(rid, None)


def densify_kernel(weight: Tensor, dilation: tuple[int, int]) -> Tensor:
    """A dilated kernel as the dense kernel it equals: zeros between the taps (differentiable)."""
    dh, dw = dilation
    if dh == 1 and dw == 1:
        return weight
    kh, kw = weight.shape[-2:]
    dense = weight.new_zeros((*weight.shape[:-2], dh * (kh - 1) + 1, dw * (kw - 1) + 1))
    dense[..., ::dh, ::dw] = weight
    return dense


def fft_depthwise_conv2d(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    padding: tuple[int, int] = (0, 0),
    dilation: tuple[int, int] = (1, 1),
    memory_format: torch.memory_format | None = None,
) -> Tensor:
    """Stride-1 depthwise ``conv2d`` (``groups = channels``, weight ``[C, 1, kh, kw]``) by FFT.

    Equals ``F.conv2d(x, weight, bias, padding=padding, dilation=dilation, groups=C)`` up to float rounding;
    differentiable in ``x``, ``weight`` and ``bias``. The result is laid out as ``memory_format`` asks
    (default: channels-last for channels-last ``x``, else contiguous). In inference the kernel's spectrum
    is kept per parameter (:func:`set_fft_kernel_cache`).
    """
    if x.dim() != 4 or weight.dim() != 4 or weight.shape[0] != x.shape[1] or weight.shape[1] != 1:
        raise ValueError(f"expected a B×C×H×W input and a C×1×kh×kw weight, got {tuple(x.shape)} and "
                         f"{tuple(weight.shape)}")
    if memory_format not in (None, torch.contiguous_format, torch.channels_last):
        raise ValueError(f"memory_format must be None, torch.contiguous_format or torch.channels_last, got "
                         f"{memory_format}")
    out_dtype = x.dtype
    work = torch.float64 if x.dtype == torch.float64 else torch.float32
    if memory_format is None:
        cl = not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)
        memory_format = torch.channels_last if cl else torch.contiguous_format
    dh, dw = dilation
    kh, kw = dh * (weight.shape[-2] - 1) + 1, dw * (weight.shape[-1] - 1) + 1
    ph, pw = padding
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
        return fft_depthwise_conv2d(x, weight, bias, (0, 0), dilation, memory_format)
    s = (fft_size(max(h + ph, kh)), fft_size(max(w + pw, kw)))
    kernel_f = _kernel_spectrum(weight, work, dilation, s)
    per_sample = c * s[0] * (s[1] // 2 + 1)
    chunk = max(1, _CHUNK_ELEMENTS // max(per_sample, 1))
    x = x.to(work)
    bias = bias.to(work).view(1, c, 1, 1) if bias is not None else None
    grad = torch.is_grad_enabled() and (x.requires_grad or kernel_f.requires_grad or (
        bias is not None and bias.requires_grad))
    if not grad:
        # inference: the FFT reads NCHW-contiguous planes 15-25% faster than channels-last ones (b32,
        # 28²-56²), so one copy first; each chunk's window (plus the bias) is then written straight into
        # the output, in its layout (in training both measured no gain: autograd's copies eat it)
        x = x.contiguous()
        out = torch.empty((b, c, *out_hw), dtype=out_dtype, device=x.device, memory_format=memory_format)
        for i in range(0, b, chunk):
            y = _fft_conv(x[i : i + chunk], kernel_f, s, off, out_hw, inference=True)
            if bias is not None:
                torch.add(y, bias, out=out[i : i + chunk])
            else:
                out[i : i + chunk].copy_(y)
        return out
    ys = [_fft_conv(xc, kernel_f, s, off, out_hw, inference=False) for xc in x.split(chunk)]
    y = ys[0] if len(ys) == 1 else torch.cat(ys)
    if bias is not None:
        y = y + bias
    return y.contiguous(memory_format=memory_format).to(out_dtype)
