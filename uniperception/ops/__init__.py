"""Fast large-kernel depthwise convolution (CPU now, GPU when present): implementations and dispatch.

Layers call :func:`depthwise_conv2d` or use :class:`DepthwiseConv2d` (a drop-in ``nn.Conv2d`` with the
same state-dict keys); they never call an implementation directly.
"""

from .depthwise import (
    IMPLS,
    CpuProfile,
    DepthwiseConv2d,
    available_impls,
    choose_impl,
    conv_impl_state,
    cpu_profile,
    crop_kernel_to_reach,
    depthwise_conv2d,
    estimate_cost_ms,
    force_impl,
    load_conv_impl_state,
    resolve_impl,
    set_autotune,
    set_conv_impl,
    set_cpu_profile,
)
from .fft import clear_fft_kernel_cache, fft_depthwise_conv2d, set_fft_kernel_cache

__all__ = [
    "IMPLS",
    "CpuProfile",
    "DepthwiseConv2d",
    "available_impls",
    "choose_impl",
    "clear_fft_kernel_cache",
    "conv_impl_state",
    "cpu_profile",
    "crop_kernel_to_reach",
    "depthwise_conv2d",
    "estimate_cost_ms",
    "fft_depthwise_conv2d",
    "force_impl",
    "load_conv_impl_state",
    "resolve_impl",
    "set_autotune",
    "set_conv_impl",
    "set_cpu_profile",
    "set_fft_kernel_cache",
]
