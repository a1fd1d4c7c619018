"""Large-kernel depthwise convolution: several exact implementations and a dispatch that picks one.

Every implementation computes ``F.conv2d(x, weight, bias, stride=1, padding, dilation, groups=C)`` for a
depthwise weight ``[C, 1, kh, kw]`` (rectangular and dilated kernels included) and is differentiable:

* ``native``: PyTorch's own convolution, as called (the reference).
* ``channels_last``: oneDNN's direct NHWC kernel; in inference a 13×13 kernel on maps up to 32 wide is
  zero-padded to 15×15 there (oneDNN's 13×13 NHWC path is twice as slow as its 15×15 one at those sizes, for
  the same output).
* ``blocked``: oneDNN on its 16-channel blocked layout (inference only, float32, CPU).
* ``direct``: oneDNN's NHWC forward with a hand-written backward made of forward convolutions: the input
  gradient is the output gradient convolved with the flipped kernel, the weight gradient a depthwise
  correlation of input and output gradient with the batch folded into the channels (the output gradient
  is the "kernel", the kernel taps are the outputs). PyTorch's own depthwise weight gradient unfolds every
  (output, tap) pair (im2col); this path is 3-8× faster for large kernels on small maps.
* ``fft``: real 2-D FFTs (:mod:`uniperception.ops.fft`), whose cost does not grow with the kernel; the
  result keeps the input's memory format (channels-last in, channels-last out).
* ``triton``: a Triton GPU kernel (:mod:`uniperception.ops.triton_dw`), imported only on CUDA.

Before any implementation runs, the kernel is **cropped to the taps that can reach the image** (for a
51×51 kernel on a 7×7 map, only the central 13×13 ever touches a pixel). That is exact, keeps gradients
(taps that never touch the image get zero gradient, as in PyTorch), and is what makes very large kernels
on small maps cheap for every implementation, backward included. Where the CPU profile says oneDNN's
dilated kernels are slow (AVX2), a wide dilated kernel runs either as **undilated convs on the map's
interleaved sub-grids** (space-to-batch, exact; a 7×7 kernel with dilation 2 costs 49 taps per pixel) or,
on maps too small for that, as its dense zero-filled equivalent. ``impl="native"`` is never rewritten.

``impl="auto"`` asks :func:`choose_impl`, a small cost model seeded with measurements on two 2-core x86 CPUs,
one with AVX-512 and one with AVX2 only, whose oneDNN kernels rank very differently (see
``docs/benchmarks.md`` and :func:`cpu_profile`), optionally refined by timing the candidates once per shape
(:func:`set_autotune`, like ``cudnn.benchmark``). The choice can be forced per call (``impl=``), per
model (``model.set_conv_impl``) or globally with the environment variable ``UNIPERCEPTION_CONV_IMPL``.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import os
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import InvalidInputError
from .fft import densify_kernel, fft_depthwise_conv2d, smooth7_size

__all__ = [
    "IMPLS",
    "PROFILES",
    "CpuProfile",
    "DepthwiseConv2d",
    "available_impls",
    "choose_impl",
    "conv_impl_state",
    "cpu_profile",
    "crop_kernel_to_reach",
    "depthwise_conv2d",
    "load_conv_impl_state",
    "resolve_impl",
    "set_autotune",
    "set_conv_impl",
    "set_cpu_profile",
]

logger = logging.getLogger(__name__)

IMPLS: tuple[str, ...] = ("native", "channels_last", "direct", "blocked", "fft", "triton")
ENV_VAR = "UNIPERCEPTION_CONV_IMPL"
PROFILE_ENV_VAR = "UNIPERCEPTION_CPU_PROFILE"

Impl = Callable[[Tensor, Tensor, Tensor | None, tuple[int, int], tuple[int, int]], Tensor]


def _pair(v: int | tuple[int, int] | list[int]) -> tuple[int, int]:
    if isinstance(v, int):
        return (v, v)
    a, b = v
    return (int(a), int(b))


# ------------------------------------------------------------------------------------------------ impls
class _ContiguousStridesGrad(torch.autograd.Function):
    """Identity forward; backward restrides a contiguous gradient to the exact strides of a contiguous weight.

    PyTorch's depthwise conv backward on channels-last input returns the ``[C, 1, kh, kw]`` weight gradient
    with strides ``[k², 1, kw, 1]``: the same memory as the parameter's ``[k², k², kw, 1]`` (they differ only
    on the size-1 dimension), but DDP compares strides literally and warns ("grad strides do not match bucket
    view strides") and copies. The restrided view costs nothing.
    """

    @staticmethod
    def forward(ctx: Any, w: Tensor) -> Tensor:
        ctx.strides = w.stride()
        return w.view_as(w)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        if grad.stride() != ctx.strides and grad.is_contiguous():
            return grad.as_strided(grad.shape, ctx.strides, grad.storage_offset())
        return grad


def _weight_for_grad(w: Tensor, x: Tensor, b: Tensor | None) -> Tensor:
    """``w`` for PyTorch's conv: a whole contiguous parameter gets its gradient back in its own strides."""
    if w.requires_grad and w._base is None and w.is_contiguous() and _needs_grad(x, w, b):
        return _ContiguousStridesGrad.apply(w)
    return w


def _native(x: Tensor, w: Tensor, b: Tensor | None, padding: tuple[int, int], dilation: tuple[int, int]) -> Tensor:
    return F.conv2d(x, _weight_for_grad(w, x, b), b, 1, padding, dilation, x.shape[1])


def _channels_last(
    x: Tensor, w: Tensor, b: Tensor | None, padding: tuple[int, int], dilation: tuple[int, int]
) -> Tensor:
    # on AVX-512 CPUs oneDNN's NHWC 13×13 forward is a slow spot on maps up to ~28 wide that 15×15 avoids
    # (2.0-2.4× at 80@28², 160@14², 320@7²; at 56² the plain kernel is faster; on AVX2 15×15 is 1.1-1.9×
    # slower, so that profile never pads); in training the padded kernel's backward is 4-5× slower
    # (docs/benchmarks.md), so only inference pads
    if (
        x.device.type == "cpu" and tuple(w.shape[-2:]) == (13, 13) and dilation == (1, 1)
        and x.shape[-1] <= cpu_profile().pad13_max_width and not _needs_grad(x, w, b)
    ):
        w = F.pad(w, (1, 1, 1, 1))
        padding = (padding[0] + 1, padding[1] + 1)
    x = x.contiguous(memory_format=torch.channels_last)
    return F.conv2d(x, _weight_for_grad(w, x, b), b, 1, padding, dilation, x.shape[1])


class _DirectDepthwise(torch.autograd.Function):
    """NHWC depthwise conv whose backward is two forward-type convolutions (no im2col)."""

    @staticmethod
    def forward(ctx, x: Tensor, w: Tensor, b: Tensor | None, padding: tuple[int, int],  # type: ignore[override]
                dilation: tuple[int, int]) -> Tensor:
        ctx.dtypes = (x.dtype, w.dtype, b.dtype if b is not None else None)
        dev = x.device.type
        if torch.is_autocast_enabled(dev):  # cast as autocast would for conv2d, then keep one dtype throughout
            dt = torch.get_autocast_dtype(dev)
            x, w = x.to(dt), w.to(dt)
            b = b.to(dt) if b is not None else None
        x = x.contiguous(memory_format=torch.channels_last)
        ctx.save_for_backward(x, w)
        ctx.padding, ctx.dilation, ctx.has_bias = padding, dilation, b is not None
        with torch.autocast(dev, enabled=False):
            return F.conv2d(x, w, b, 1, padding, dilation, x.shape[1])

    @staticmethod
    def backward(ctx, gy: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        x, w = ctx.saved_tensors
        with torch.autocast(x.device.type, enabled=False):
            grads = _direct_backward(x, w, gy.to(x.dtype), ctx.padding, ctx.dilation, ctx.needs_input_grad[:2],
                                     ctx.has_bias and ctx.needs_input_grad[2])
        out = tuple(g.to(dt) if g is not None else None for g, dt in zip(grads, ctx.dtypes, strict=True))
        return (*out, None, None)


def _direct_backward(
    x: Tensor, w: Tensor, gy: Tensor, padding: tuple[int, int], dilation: tuple[int, int],
    needs: tuple[bool, bool], needs_bias: bool,
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """Input, weight and bias gradients of a stride-1 depthwise conv, each as a forward convolution."""
    b, c, h, wd = x.shape
    kh, kw = w.shape[-2:]
    (ph, pw), (dh, dw) = padding, dilation
    gy = gy.contiguous(memory_format=torch.channels_last)
    oh, ow = gy.shape[-2:]
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32  # batch sums (x and dy share a dtype)
    gx = gw = gb = None
    if needs[0]:
        # dx = dy ⋆ flip(w) with the complementary padding (negative padding: crop dy first)
        qh, qw = dh * (kh - 1) - ph, dw * (kw - 1) - pw
        g = gy
        if qh < 0 or qw < 0:
            g = F.pad(gy, (min(qw, 0), min(qw, 0), min(qh, 0), min(qh, 0)))
            g = g.contiguous(memory_format=torch.channels_last)
        gx = F.conv2d(g, w.flip(-2, -1), None, 1, (max(qh, 0), max(qw, 0)), dilation, c)
    if needs[1]:
        # dw[c, i, j] = Σ_{n,y,x} x_pad[n, c, y + i·dh, x + j·dw] · dy[n, c, y, x]: a depthwise conv of the
        # input (batch folded into B·C channels, kept NHWC with a dense batch stride so oneDNN takes its
        # NHWC kernel) with dy as a per-channel kernel, strided by the dilation; then a sum over the batch
        xt = x.permute(2, 3, 0, 1).reshape(1, h, wd, b * c).permute(0, 3, 1, 2)
        kt = gy.reshape(b * c, 1, oh, ow)
        r = F.conv2d(xt, kt, None, (dh, dw), (ph, pw), 1, b * c)
        gw = r.reshape(b, c, kh, kw).sum(0, dtype=acc).unsqueeze(1).to(w.dtype)
    if needs_bias:
        gb = gy.sum((0, 2, 3), dtype=acc).to(gy.dtype)
    return gx, gw, gb


def _direct(x: Tensor, w: Tensor, b: Tensor | None, padding: tuple[int, int], dilation: tuple[int, int]) -> Tensor:
    if not _needs_grad(x, w, b):
        return _channels_last(x, w, b, padding, dilation)
    return _DirectDepthwise.apply(x, w, b, padding, dilation)


def _blocked(x: Tensor, w: Tensor, b: Tensor | None, padding: tuple[int, int], dilation: tuple[int, int]) -> Tensor:
    if torch.is_grad_enabled() and (x.requires_grad or w.requires_grad or (b is not None and b.requires_grad)):
        raise InvalidInputError("impl='blocked' is inference-only (oneDNN blocked tensors have no autograd)")
    if x.device.type != "cpu" or x.dtype != torch.float32:
        raise InvalidInputError("impl='blocked' needs float32 tensors on the CPU")
    y = torch.mkldnn_convolution(x.contiguous().to_mkldnn(), w.contiguous(), b, padding, (1, 1), dilation, x.shape[1])
    return y.to_dense()


class _ChannelsLastGrad(torch.autograd.Function):
    """Identity forward; backward hands the gradient on in channels-last memory format."""

    @staticmethod
    def forward(ctx: object, x: Tensor) -> Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx: object, grad: Tensor) -> Tensor:
        return grad.contiguous(memory_format=torch.channels_last)


def channels_last_grad(x: Tensor) -> Tensor:
    """``x``, with its gradient made channels-last on the way back (a no-op without autograd).

    Gradients that come back from pooling arrive NCHW (or as stride-0 expansions) and the skip connections
    carry them unchanged through every block, so without this each backward op of a channels-last network
    mixes layouts and drops to PyTorch's slow strided loops: measured on a 2-core CPU, ``gelu_backward`` of an
    NCHW gradient against a channels-last input is 14× slower than with both channels-last, a product 4×.
    The FFT path uses it too: its input gradient comes out of ``irfft2`` NCHW-contiguous.
    """
    if x.dim() != 4 or not (torch.is_grad_enabled() and x.requires_grad) or torch.jit.is_tracing() or (
        torch.jit.is_scripting() or torch.compiler.is_compiling()
    ):
        return x
    return _ChannelsLastGrad.apply(x)


def _fft(x: Tensor, w: Tensor, b: Tensor | None, padding: tuple[int, int], dilation: tuple[int, int]) -> Tensor:
    channels_last = _is_channels_last(x)
    # keep the caller's layout: a channels-last model handed an NCHW tensor would run every later op of
    # the block (norms, 1×1 convs, residual add) on the slower NCHW paths or convert back and forth
    # (fft_depthwise_conv2d's default output layout is the input's)
    return fft_depthwise_conv2d(channels_last_grad(x) if channels_last else x, w, b, padding, dilation)


def _is_channels_last(x: Tensor) -> bool:
    """Whether ``x`` is laid out NHWC (and not also NCHW-contiguous, as tensors with C or H·W of 1 are)."""
    return x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)


def _triton(x: Tensor, w: Tensor, b: Tensor | None, padding: tuple[int, int], dilation: tuple[int, int]) -> Tensor:
    from .triton_dw import triton_depthwise_conv2d  # only ever imported when asked for

    return triton_depthwise_conv2d(x, w, b, padding, dilation)


_IMPL_FNS: dict[str, Impl] = {
    "native": _native,
    "channels_last": _channels_last,
    "direct": _direct,
    "blocked": _blocked,
    "fft": _fft,
    "triton": _triton,
}


@functools.cache
def _triton_available() -> bool:
    if not torch.cuda.is_available():
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def available_impls(device: torch.device | str = "cpu", training: bool = False) -> list[str]:
    """Implementations usable for tensors on ``device`` (``training``: that support autograd)."""
    dev = torch.device(device)
    out = ["native", "channels_last", "direct", "fft"]
    if dev.type == "cpu" and not training:
        out.append("blocked")
    if dev.type == "cuda" and _triton_available():
        out.append("triton")
    return out


# ------------------------------------------------------------------------------------------------ cropping
def _reach(size: int, k: int, pad: int, dil: int) -> tuple[int, int]:
    """First and last tap index (along one axis) that touches the input for some output position."""
    out = size + 2 * pad - dil * (k - 1)
    lo = max(0, math.ceil((pad - (out - 1)) / dil))
    hi = min(k - 1, (pad + size - 1) // dil)
    return lo, hi


def crop_kernel_to_reach(
    weight: Tensor, size: tuple[int, int], padding: tuple[int, int], dilation: tuple[int, int]
) -> tuple[Tensor, tuple[int, int]]:
    """Drop kernel taps that never touch the input; returns ``(weight', padding')`` with the same output.

    Exact for stride 1 (outputs unchanged, gradients of the dropped taps are zero as in PyTorch).
    """
    kh, kw = weight.shape[-2:]
    # crop the same number of taps on both sides: symmetric padding must stay symmetric
    ch = _symmetric_crop(size[0], kh, padding[0], dilation[0])
    cw = _symmetric_crop(size[1], kw, padding[1], dilation[1])
    if ch == 0 and cw == 0:
        return weight, padding
    return (
        weight[..., ch : kh - ch, cw : kw - cw],
        (padding[0] - ch * dilation[0], padding[1] - cw * dilation[1]),
    )


@functools.lru_cache(maxsize=4096)
def _symmetric_crop(size: int, k: int, pad: int, dil: int) -> int:
    lo, hi = _reach(size, k, pad, dil)
    if hi < lo:
        return 0
    crop = min(lo, k - 1 - hi)
    return crop if pad - crop * dil >= 0 else 0


# ------------------------------------------------------------------------------------------------ dispatch
_state = threading.local()
_AUTOTUNE = {"enabled": os.environ.get("UNIPERCEPTION_CONV_AUTOTUNE", "0") == "1"}
_AUTOTUNE_CACHE: dict[tuple, str] = {}

@dataclass(frozen=True)
class CpuProfile:
    """Cost-model constants for one family of CPUs (milliseconds, 2 threads, float32, batch 32).

    The same oneDNN build ranks its kernels very differently by instruction set: on an AVX-512 CPU
    PyTorch's NCHW depthwise kernel is the fastest for 13×13 inference, on an AVX2-only one it is 6× slower
    than the NHWC kernel, and a 15×15-padded 13×13 kernel is 2× faster on one and 1.2× slower on the other
    (``docs/benchmarks.md`` has both sets of measurements).
    """

    name: str
    #: direct NHWC forward, per (output position, in-image tap) pair
    direct_ms_per_mac: float
    #: PyTorch's NHWC backward: weight gradient by im2col over every (output, tap) pair, per MAC at 7×7,
    #: growing with the kernel area (the im2col buffer leaves the caches)
    im2col_wgrad_ms_per_mac_k7: float
    im2col_wgrad_area_exponent: float
    #: FFT: per N·log2(N) unit of a channel plane (N = grid area) and per plane; inference / training
    fft_ms_per_unit: tuple[float, float]
    fft_ms_per_plane: tuple[float, float]
    #: inference on NCHW input: PyTorch's NCHW kernel up to this many taps and this kernel width, checked
    #: before (``nchw_native_first``) or after the rule that sends kernels up to 7×7 to channels_last
    nchw_native_max_taps: int
    nchw_native_max_width: int
    nchw_native_first: bool
    #: inference: pad 13×13 kernels to 15×15 on maps up to this width (0: never)
    pad13_max_width: int
    #: training: whether ``direct`` (hand-written backward) is a cost-model candidate, and its weight
    #: gradient's cost per in-image MAC (at maps up to 14×14; it grows with the map area beyond)
    direct_training: bool
    direct_wgrad_ms_per_mac: float
    direct_wgrad_area_exponent: float
    #: the layout copies of the direct backward, per element of x
    direct_copy_ms_per_element: float
    #: dilated kernels whose extent (dilation·(k−1)+1) exceeds this run as the equivalent dense kernel (zeros
    #: between the taps): oneDNN's dilated path is slow above it (0: never densify)
    densify_dilated_above: int = 0
    #: such a dilated kernel ("same"-like padding, a multiple of the dilation) instead runs undilated on the
    #: dilation² interleaved sub-grids of the map (space-to-batch, :func:`_space_to_batch_conv`) when every
    #: sub-grid side is at least this long (0: never); on smaller maps the copies cost more than they save
    space_to_batch_min_side: int = 0
    #: ...and the map itself is at least this wide along every dilated axis
    space_to_batch_min_map: int = 0
    #: training cost of PyTorch's channels_last backward for a dilated kernel, × the undilated estimate
    dilated_channels_last_training_factor: float = 1.0


PROFILES: dict[str, CpuProfile] = {
    # 2-core AMD EPYC with AVX-512 (the first project VMs): fitted by ``benchmarks/lk_conv.py --calibrate``
    "avx512": CpuProfile(
        name="avx512", direct_ms_per_mac=1.7e-8, im2col_wgrad_ms_per_mac_k7=7e-8, im2col_wgrad_area_exponent=0.9,
        fft_ms_per_unit=(3.3e-7, 9e-7), fft_ms_per_plane=(1e-4, 3e-4),
        # NCHW 13×13: 1.3-1.6× faster than channels_last at every stage shape, 51×5 too; it falls off a
        # cliff for large kernels (31×31 at 40@56²: 631 ms vs 34 ms)
        nchw_native_max_taps=255, nchw_native_max_width=1 << 30, nchw_native_first=False, pad13_max_width=32,
        # the direct backward was built after those machines were measured: only autotune picks it there
        direct_training=False, direct_wgrad_ms_per_mac=7e-8, direct_wgrad_area_exponent=0.4,
        direct_copy_ms_per_element=2e-7,
    ),
    # 2-core AMD EPYC with AVX2 only: oneDNN's NCHW (and blocked) depthwise kernel falls back to a slow path
    # for kernels wider than 9 taps (13×13 at 40@56²: NCHW 172 ms vs NHWC 27 ms; 5×13 at 80@28²: 50 vs 6 ms)
    # and is the fastest for narrower ones, tall ones included (51×5 at 80@28²: 6 vs 11 ms)
    "avx2": CpuProfile(
        name="avx2", direct_ms_per_mac=4.2e-8, im2col_wgrad_ms_per_mac_k7=7e-8, im2col_wgrad_area_exponent=0.9,
        # inference FFT refitted after its pruned inverse, NCHW copy and kept kernel spectra (2026-12-03,
        # ``lk_conv.py --passes fwd --all-impls --calibrate``, b1 and b32, 13/31/51/51×5 at the four stage
        # shapes: a per-call ~0.18 ms that channels_last pays as well is left out of both)
        fft_ms_per_unit=(3.5e-7, 1.45e-6), fft_ms_per_plane=(3.3e-4, 4.8e-4),
        nchw_native_max_taps=1 << 30, nchw_native_max_width=9, nchw_native_first=True, pad13_max_width=0,
        direct_training=True, direct_wgrad_ms_per_mac=7e-8, direct_wgrad_area_exponent=0.4,
        direct_copy_ms_per_element=4e-7,
        # dilated NHWC kernels wider than 9 taps fall back there too (7×7 dilation 2 at 160@14², training:
        # 91 ms, as the dense 13×13 through the engine 20 ms; 3×3 dilation 5: 25 vs 16.5 ms); narrower ones are
        # fast forward but their PyTorch backward is 3-6× slower than direct's (3×3 dilation 3: 15.5 vs 4.3 ms)
        densify_dilated_above=9, dilated_channels_last_training_factor=12.0,
        # ...and better still as sub-grid convs (7×7 dilation 2 at 80@28², training: 89 ms densified, 46 ms as
        # four 7×7 convs on 14² sub-grids; 3×3 dilation 5: 56 vs 21 ms); at 320@7² 3×3 dilation 5 (2×2
        # sub-grids) it is 9 vs 77 ms, hence the minimum side (3: 160@14² 3×3 dilation 5, 18 vs 8 ms)
        # and at 320@7² 7×7 dilation 2 (4×4 sub-grids) it is 11.4 vs 15.4 ms, hence the minimum map
        space_to_batch_min_side=3, space_to_batch_min_map=14,
    ),
}
_PROFILE: dict[str, CpuProfile | None] = {"forced": None}


@functools.cache
def _detected_profile() -> str:
    cap = str(torch.backends.cpu.get_cpu_capability()).upper()
    return "avx512" if cap.startswith("AVX512") else "avx2"


def cpu_profile() -> CpuProfile:
    """The cost-model constants in use: :func:`set_cpu_profile`, then ``UNIPERCEPTION_CPU_PROFILE``
    (``avx512`` / ``avx2``), then the CPU's vector capability as PyTorch reports it (every CPU without
    AVX-512 gets the ``avx2`` constants). The setting is process-wide, like :func:`set_autotune`."""
    forced = _PROFILE["forced"]
    if forced is not None:
        return forced
    name = os.environ.get(PROFILE_ENV_VAR) or _detected_profile()
    if name not in PROFILES:
        raise InvalidInputError(f"unknown CPU profile {name!r} in ${PROFILE_ENV_VAR}; choose from {sorted(PROFILES)}")
    return PROFILES[name]


def set_cpu_profile(profile: str | CpuProfile | None) -> None:
    """Use these cost-model constants (a name from :data:`PROFILES` or a :class:`CpuProfile`);
    ``None`` goes back to detection."""
    if isinstance(profile, str):
        if profile not in PROFILES:
            raise InvalidInputError(f"unknown CPU profile {profile!r}; choose from {sorted(PROFILES)}")
        profile = PROFILES[profile]
    _PROFILE["forced"] = profile


def _taps(size: int, k: int, pad: int, dil: int) -> int:
    """Number of (output position, tap) pairs along one axis whose input index is inside the image."""
    out = size + 2 * pad - dil * (k - 1)
    total = 0
    for j in range(k):
        lo = max(0, pad - j * dil)
        hi = min(out - 1, size - 1 + pad - j * dil)
        total += max(0, hi - lo + 1)
    return total


def estimate_cost_ms(
    impl: str,
    x_shape: tuple[int, ...],
    k_shape: tuple[int, int],
    padding: tuple[int, int],
    training: bool,
    dilation: tuple[int, int] = (1, 1),
) -> float:
    """The cost model's estimate for one call (after cropping), in milliseconds on a reference CPU of the
    current :func:`cpu_profile`.

    ``training`` means forward + backward (input and weight gradients). A dilated kernel costs its real
    taps in the direct implementations and its full extent in the FFT one.
    """
    prof = cpu_profile()
    b, c, h, w = x_shape
    kh, kw = k_shape
    ph, pw = padding
    dh, dw = dilation
    eh, ew = dh * (kh - 1) + 1, dw * (kw - 1) + 1
    planes = b * c
    oh, ow = h + 2 * ph - eh + 1, w + 2 * pw - ew + 1
    if impl in ("channels_last", "native", "blocked", "direct"):
        in_image = planes * _taps(h, kh, ph, dh) * _taps(w, kw, pw, dw)
        fwd = in_image * prof.direct_ms_per_mac
        if impl == "native" and (kh, kw) != (3, 3):
            fwd *= 2.0
        if not training:
            return fwd
        if impl == "direct":
            # forward + input gradient (a forward with the flipped kernel) + the weight gradient, whose
            # "kernel" is the output map: oneDNN's efficiency drops once that map is large
            area = max(1.0, oh * ow / 196) ** prof.direct_wgrad_area_exponent
            copies = 3 * planes * h * w * prof.direct_copy_ms_per_element
            return 2 * fwd + in_image * prof.direct_wgrad_ms_per_mac * area + copies
        per_mac = prof.im2col_wgrad_ms_per_mac_k7 * (kh * kw / 49) ** prof.im2col_wgrad_area_exponent
        cost = 3 * fwd + planes * oh * ow * kh * kw * per_mac
        return cost * prof.dilated_channels_last_training_factor if (dh, dw) != (1, 1) else cost
    if impl == "fft":
        # the profiles' FFT constants were fitted when the grid was the smallest 7-smooth size; the FFT now runs
        # on cheaper grids (:func:`fft_size`), so this over-estimates it a little and keeps the measured choices
        s0, s1 = smooth7_size(max(h + ph, eh)), smooth7_size(max(w + pw, ew))
        n = s0 * s1
        return planes * (n * math.log2(max(n, 2)) * prof.fft_ms_per_unit[training] + prof.fft_ms_per_plane[training])
    return math.inf


def choose_impl(
    x: Tensor, weight: Tensor, padding: tuple[int, int], dilation: tuple[int, int], training: bool
) -> str:
    """Pick the fastest correct implementation for these tensors (after kernel cropping).

    Order of precedence: a forced implementation (:func:`force_impl` context or ``UNIPERCEPTION_CONV_IMPL``),
    then the autotune cache (when enabled), then the cost model.
    """
    forced = getattr(_state, "forced", None) or os.environ.get(ENV_VAR) or None
    if forced and forced != "auto":
        return forced
    if x.device.type == "cuda":
        kh, kw = weight.shape[-2:]
        return "triton" if _triton_available() and max(kh, kw) >= 7 and x.dtype != torch.float64 else "native"
    if x.device.type != "cpu":
        return "native"
    if _AUTOTUNE["enabled"]:
        key = (tuple(x.shape), tuple(weight.shape), padding, dilation, x.dtype, training)
        if key not in _AUTOTUNE_CACHE:
            _AUTOTUNE_CACHE[key] = _autotune(x, weight, padding, dilation, training)
        return _AUTOTUNE_CACHE[key]
    kh, kw = weight.shape[-2:]
    return _cost_model_choice(tuple(x.shape), (kh, kw), padding, dilation, training, _is_channels_last(x),
                              cpu_profile())


@functools.lru_cache(maxsize=4096)
def _cost_model_choice(
    shape: tuple[int, ...], k_shape: tuple[int, int], padding: tuple[int, int], dilation: tuple[int, int],
    training: bool, channels_last: bool, prof: CpuProfile,
) -> str:
    """The cost model's pick (cached: a model calls it with a handful of shapes, ~40 µs each uncached)."""
    kh, kw = k_shape
    if not training and dilation == (1, 1):
        nchw = not channels_last and kh * kw <= prof.nchw_native_max_taps and kw <= prof.nchw_native_max_width
        if nchw and prof.nchw_native_first:
            return "native"
        if max(kh, kw) <= 7:
            return "channels_last"
        if nchw:
            return "native"
    candidates = ["channels_last", "fft"]
    if training and prof.direct_training:
        candidates.insert(1, "direct")
    costs = {impl: estimate_cost_ms(impl, shape, (kh, kw), padding, training, dilation) for impl in candidates}
    return min(costs, key=costs.__getitem__)


def _autotune(x: Tensor, weight: Tensor, padding: tuple[int, int], dilation: tuple[int, int], training: bool) -> str:
    candidates = available_impls(x.device, training)
    best, best_t = "native", math.inf
    xs = x.detach().clone().requires_grad_(training)
    ws = weight.detach().clone().requires_grad_(training)
    # CUDA calls return before the kernels finish: time them to completion
    sync = torch.cuda.synchronize if x.device.type == "cuda" else (lambda: None)
    for impl in candidates:
        try:
            times = []
            for _ in range(3):
                sync()
                t0 = time.perf_counter()
                with torch.set_grad_enabled(training):
                    y = _IMPL_FNS[impl](xs, ws, None, padding, dilation)
                    if training:
                        y.backward(torch.ones_like(y))
                sync()
                times.append(time.perf_counter() - t0)
            t = sorted(times)[1]
        except (InvalidInputError, RuntimeError):
            continue
        if t < best_t:
            best, best_t = impl, t
    logger.debug("autotune %s -> %s (%.2f ms)", tuple(x.shape), best, best_t * 1e3)
    return best


def set_autotune(enabled: bool = True) -> None:
    """Time candidate implementations once per shape and cache the fastest (non-deterministic choice)."""
    _AUTOTUNE["enabled"] = enabled
    _AUTOTUNE_CACHE.clear()


@contextlib.contextmanager
def force_impl(impl: str | None) -> Iterator[None]:
    """Within the block every ``impl="auto"`` call uses ``impl`` (``None``/``"auto"``: no forcing)."""
    if impl is not None and impl != "auto" and impl not in IMPLS:
        raise InvalidInputError(f"unknown convolution implementation {impl!r}; choose from {IMPLS}")
    old = getattr(_state, "forced", None)
    _state.forced = None if impl == "auto" else impl
    try:
        yield
    finally:
        _state.forced = old


# ------------------------------------------------------------------------------------------------ entry
def depthwise_conv2d(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    stride: int | tuple[int, int] = 1,
    padding: int | tuple[int, int] | str = 0,
    dilation: int | tuple[int, int] = 1,
    impl: str = "auto",
) -> Tensor:
    """Depthwise 2-D convolution (``groups = channels``) through the fastest exact implementation.

    Args:
        x: ``B×C×H×W`` input.
        weight: ``C×1×kh×kw`` kernel (any sizes, square or rectangular).
        bias: optional ``C`` bias.
        stride: only 1 uses the fast paths; other strides run ``native``.
        padding: int, ``(ph, pw)`` or ``"same"`` (odd effective kernel sizes).
        dilation: int or pair.
        impl: ``"auto"`` or one of :data:`IMPLS`.

    Returns:
        The same values as ``F.conv2d(x, weight, bias, stride, padding, dilation, groups=C)`` (float32
        ≤1e-4 relative, bfloat16 ≤2e-2 relative), in ``x``'s dtype.
    """
    if x.dim() != 4 or weight.dim() != 4:
        raise InvalidInputError(f"expected 4-D input and weight, got {tuple(x.shape)} and {tuple(weight.shape)}")
    c = x.shape[1]
    if weight.shape[0] != c or weight.shape[1] != 1:
        raise InvalidInputError(f"depthwise weight must be [{c}, 1, kh, kw], got {tuple(weight.shape)}")
    stride, dilation = _pair(stride), _pair(dilation)
    kh, kw = weight.shape[-2:]
    if isinstance(padding, str):
        if padding != "same":
            raise InvalidInputError(f"padding must be an int, a pair or 'same', got {padding!r}")
        eh, ew = dilation[0] * (kh - 1), dilation[1] * (kw - 1)
        if eh % 2 or ew % 2:
            raise InvalidInputError("padding='same' needs odd effective kernel sizes")
        padding = (eh // 2, ew // 2)
    padding = _pair(padding)
    if impl != "auto" and impl not in IMPLS:
        raise InvalidInputError(f"unknown convolution implementation {impl!r}; choose from {IMPLS}")
    if stride != (1, 1) or _is_tracing():
        # strided convs, and graphs being traced/exported/compiled, use the standard op: exported
        # graphs then hold a plain convolution every runtime (ONNX, torch.export, TorchScript) knows
        return F.conv2d(x, weight, bias, stride, padding, dilation, c)
    if impl != "native" and _space_to_batch_applies(x, weight, padding, dilation):
        return _space_to_batch_conv(x, weight, bias, padding, dilation, impl)
    weight, padding, dilation = _prepare_kernel(x, weight, padding, dilation, densify=impl != "native")
    chosen = impl if impl != "auto" else choose_impl(x, weight, padding, dilation, _needs_grad(x, weight, bias))
    if chosen not in _IMPL_FNS:
        raise InvalidInputError(f"unknown convolution implementation {chosen!r}; choose from {IMPLS}")
    return _IMPL_FNS[chosen](x, weight, bias, padding, dilation)


def _is_tracing() -> bool:
    return torch.jit.is_tracing() or torch.jit.is_scripting() or torch.compiler.is_compiling()


def _needs_grad(x: Tensor, weight: Tensor, bias: Tensor | None) -> bool:
    return torch.is_grad_enabled() and (
        x.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad)
    )


def resolve_impl(
    x: Tensor, weight: Tensor, bias: Tensor | None, padding: tuple[int, int], dilation: tuple[int, int]
) -> str:
    """The implementation ``impl="auto"`` would run for these arguments (stride 1); for a dilated kernel run
    on sub-grids (:func:`_space_to_batch_conv`), the one its undilated sub-grid convolution runs."""
    training = _needs_grad(x, weight, bias)
    if _space_to_batch_applies(x, weight, padding, dilation):
        (dh, dw), (ph, pw) = dilation, padding
        b, c, h, wd = x.shape
        fmt = torch.channels_last if _is_channels_last(x) else torch.contiguous_format
        sub = torch.empty(dh * dw * b, c, -(-h // dh), -(-wd // dw), dtype=x.dtype, device=x.device,
                          memory_format=fmt)  # shape, layout and dtype only: the cost model reads no values
        x, padding, dilation = sub, (ph // dh, pw // dw), (1, 1)
    w, p, d = _prepare_kernel(x, weight, padding, dilation, densify=True)
    return choose_impl(x, w, p, d, training)


def _prepare_kernel(
    x: Tensor, weight: Tensor, padding: tuple[int, int], dilation: tuple[int, int], densify: bool
) -> tuple[Tensor, tuple[int, int], tuple[int, int]]:
    """What every implementation but ``native`` receives: the kernel densified where the CPU profile says
    so, then cropped to the taps that reach the image."""
    if densify:
        weight, dilation = _densify_dilated(x, weight, dilation)
    weight, padding = crop_kernel_to_reach(weight, tuple(x.shape[-2:]), padding, dilation)
    return weight, padding, dilation


def _densify_dilated(x: Tensor, weight: Tensor, dilation: tuple[int, int]) -> tuple[Tensor, tuple[int, int]]:
    """A dilated kernel as the dense kernel it equals (zeros between taps; same padding, same output), where
    the CPU profile says the dense kernel is faster. Differentiable: the zeros get no gradient."""
    if dilation == (1, 1) or x.device.type != "cpu":
        return weight, dilation
    limit = cpu_profile().densify_dilated_above
    if not limit:
        return weight, dilation
    (kh, kw), (dh, dw) = weight.shape[-2:], dilation
    eh, ew = dh * (kh - 1) + 1, dw * (kw - 1) + 1
    if max(eh, ew) <= limit:
        return weight, dilation
    return densify_kernel(weight, dilation), (1, 1)


def _space_to_batch_applies(x: Tensor, weight: Tensor, padding: tuple[int, int], dilation: tuple[int, int]) -> bool:
    """Whether the CPU profile runs this dilated conv on its sub-grids (see :func:`_space_to_batch_conv`)."""
    if dilation == (1, 1) or x.device.type != "cpu":
        return False
    prof = cpu_profile()
    if not prof.space_to_batch_min_side:
        return False
    (kh, kw), (dh, dw), (ph, pw) = weight.shape[-2:], dilation, padding
    if max(dh * (kh - 1) + 1, dw * (kw - 1) + 1) <= prof.densify_dilated_above or ph % dh or pw % dw:
        return False
    h, w = x.shape[-2:]
    if h + 2 * ph - dh * (kh - 1) < 1 or w + 2 * pw - dw * (kw - 1) < 1:
        return False
    return all(-(-n // d) >= prof.space_to_batch_min_side and n >= prof.space_to_batch_min_map
               for n, d in ((h, dh), (w, dw)) if d > 1)


def _space_to_batch_conv(
    x: Tensor, weight: Tensor, bias: Tensor | None, padding: tuple[int, int], dilation: tuple[int, int], impl: str
) -> Tensor:
    """A dilated depthwise conv as one undilated conv over the ``dh·dw`` interleaved sub-grids of the map.

    With dilation ``d`` and padding ``p = q·d``, output pixel ``i + d·m`` reads only input pixels ``i + d·n``:
    each residue class ``i`` is an ordinary conv of the sub-grid ``x[..., i::d]`` with the same (undilated)
    kernel and padding ``q`` — TensorFlow's space-to-batch atrous convolution. The map is zero-padded at the
    end to a multiple of ``d`` (those zeros are the conv's own padding), the sub-grids are stacked into the
    batch, the result interleaved back and cropped. Exact, differentiable (copies and one conv), and the
    sub-grid conv runs oneDNN's fast undilated kernels: a 7×7 kernel with dilation 2 costs 49 taps, not the
    169 of its dense 13×13 equivalent. Keeps ``x``'s memory format.
    """
    b, c, h, w = x.shape
    (dh, dw), (ph, pw) = dilation, padding
    kh, kw = weight.shape[-2:]
    lh, lw = -(-h // dh), -(-w // dw)
    cl = _is_channels_last(x)
    if (lh * dh, lw * dw) != (h, w):
        x = F.pad(x, (0, lw * dw - w, 0, lh * dh - h))
    if cl:  # every copy below walks memory in NHWC order
        xn = x.contiguous(memory_format=torch.channels_last).permute(0, 2, 3, 1)
        xs = xn.reshape(b, lh, dh, lw, dw, c).permute(2, 4, 0, 1, 3, 5).reshape(dh * dw * b, lh, lw, c)
        xs = xs.permute(0, 3, 1, 2)
    else:
        xs = x.contiguous().reshape(b, c, lh, dh, lw, dw).permute(3, 5, 0, 1, 2, 4).reshape(dh * dw * b, c, lh, lw)
    y = depthwise_conv2d(xs, weight, bias, padding=(ph // dh, pw // dw), impl=impl)
    oh, ow = h + 2 * ph - dh * (kh - 1), w + 2 * pw - dw * (kw - 1)
    yh, yw = y.shape[-2:]
    if cl:
        yn = y.contiguous(memory_format=torch.channels_last).permute(0, 2, 3, 1)
        out = yn.reshape(dh, dw, b, yh, yw, c).permute(2, 3, 0, 4, 1, 5).reshape(b, dh * yh, dw * yw, c)
        return out[:, :oh, :ow].permute(0, 3, 1, 2).contiguous(memory_format=torch.channels_last)
    out = y.contiguous().reshape(dh, dw, b, c, yh, yw).permute(2, 3, 4, 0, 5, 1).reshape(b, c, dh * yh, dw * yw)
    return out[:, :, :oh, :ow].contiguous()


class DepthwiseConv2d(nn.Conv2d):
    """A stride-1 depthwise ``nn.Conv2d`` (same keys: ``weight``, ``bias``) that runs through the dispatch.

    ``impl`` is ``"auto"`` or one of :data:`IMPLS`. In training the automatic choice is made at the first
    training step and then kept (``locked_impl``), so a run is reproducible step to step; trainers save and
    restore it with :func:`conv_impl_state` / :func:`load_conv_impl_state` to make resume bit-identical.
    """

    def __init__(
        self,
        channels: int,
        kernel_size: int | tuple[int, int],
        padding: int | tuple[int, int] | str = "same",
        dilation: int | tuple[int, int] = 1,
        bias: bool = False,
        impl: str = "auto",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        kh, kw = _pair(kernel_size)
        dh, dw = _pair(dilation)
        if padding == "same":
            padding = (dh * (kh - 1) // 2, dw * (kw - 1) // 2)
        super().__init__(
            channels, channels, (kh, kw), stride=1, padding=_pair(padding), dilation=(dh, dw),  # type: ignore[arg-type]
            groups=channels, bias=bias, device=device, dtype=dtype,
        )
        if impl != "auto" and impl not in IMPLS:
            raise InvalidInputError(f"unknown convolution implementation {impl!r}; choose from {IMPLS}")
        self.impl = impl
        self.locked_impl: str | None = None

    def forward(self, x: Tensor) -> Tensor:
        impl = self.impl
        if impl == "auto" and self.training and torch.is_grad_enabled() and not _is_tracing():
            if self.locked_impl is None:
                self.locked_impl = resolve_impl(x, self.weight, self.bias, self.padding, self.dilation)  # type: ignore[arg-type]
            impl = self.locked_impl
        return depthwise_conv2d(x, self.weight, self.bias, 1, self.padding, self.dilation, impl=impl)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", impl={self.impl!r}"


def set_conv_impl(model: nn.Module, impl: str = "auto") -> nn.Module:
    """Use ``impl`` for every :class:`DepthwiseConv2d` in ``model`` (and forget locked choices)."""
    if impl != "auto" and impl not in IMPLS:
        raise InvalidInputError(f"unknown convolution implementation {impl!r}; choose from {IMPLS}")
    for m in model.modules():
        if isinstance(m, DepthwiseConv2d):
            m.impl = impl
            m.locked_impl = None
    return model


def conv_impl_state(model: nn.Module) -> dict[str, str]:
    """Module name → implementation locked during training (to store beside a training checkpoint)."""
    return {n: m.locked_impl for n, m in model.named_modules() if isinstance(m, DepthwiseConv2d) and m.locked_impl}


def load_conv_impl_state(model: nn.Module, state: dict[str, str]) -> None:
    """Restore the choices saved by :func:`conv_impl_state` (unknown names are ignored)."""
    mods = dict(model.named_modules())
    for name, impl in state.items():
        m = mods.get(name)
        if isinstance(m, DepthwiseConv2d):
            if impl not in IMPLS:
                raise InvalidInputError(f"unknown convolution implementation {impl!r} for {name}")
            m.locked_impl = impl
