"""Structural re-parameterisation algebra as small pure functions.

Everything here works on plain tensors so it can be tested exhaustively and reused by every backbone:
BatchNorm fusion, expansion of a dilated kernel into the dense kernel it is equivalent to, centre padding,
and the merge of a Dilated Reparam Block's branches into one large kernel. The maths is computed in at
least float32 (float64 stays float64) and cast back to the caller's dtype, so bfloat16 models merge
without extra rounding, on any device (no helper tensors are created on a fixed device or dtype).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor, nn

__all__ = [
    "compute_dtype",
    "dilate_kernel",
    "fuse_bn",
    "fuse_conv_bn",
    "merge_dilated_into_large_kernel",
    "pad_kernel_to",
    "reparameterize",
]


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype re-parameterisation arithmetic runs in: float64 stays, everything else is float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def fuse_bn(
    kernel: Tensor, bn: nn.BatchNorm2d | nn.BatchNorm1d, conv_bias: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """Fold an eval-mode BatchNorm into the conv (or linear) that feeds it.

    Returns ``(kernel', bias')`` with ``kernel' = kernel * t`` and
    ``bias' = bn.bias + (conv_bias - running_mean) * t`` where ``t = weight / sqrt(running_var + eps)``.
    Running statistics are used whatever the module's train/eval mode (as the official code does).
    The results are in the compute dtype (see :func:`compute_dtype`); callers cast back.
    """
    if bn.running_var is None or bn.running_mean is None:
        raise ValueError("cannot fuse a BatchNorm without running statistics (track_running_stats=False)")
    dt = compute_dtype(kernel.dtype)
    var = bn.running_var.to(dt)
    mean = bn.running_mean.to(dt)
    weight = bn.weight.detach().to(dt) if bn.weight is not None else torch.ones_like(var)
    bias = bn.bias.detach().to(dt) if bn.bias is not None else torch.zeros_like(var)
    t = weight / torch.sqrt(var + bn.eps)
    shift = -mean if conv_bias is None else conv_bias.detach().to(dt) - mean
    shape = (-1,) + (1,) * (kernel.dim() - 1)
    return kernel.detach().to(dt) * t.reshape(shape), bias + shift * t


def fuse_conv_bn(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> tuple[Tensor, Tensor]:
    """Fold ``bn`` into ``conv``; returns the fused ``(weight, bias)`` in the compute dtype."""
    return fuse_bn(conv.weight, bn, conv.bias)


def dilate_kernel(kernel: Tensor, dilation: int) -> Tensor:
    """Expand a ``[..., k, k]`` kernel with dilation ``r`` into its dense ``[..., E, E]`` equivalent.

    ``E = r·(k−1)+1`` and ``D[r·i, r·j] = w[i, j]``, zeros elsewhere. Done by strided assignment, so it
    works for every dtype and device (the official helper used a float32 transposed conv and fails on
    float64 or bfloat16 models).
    """
    if dilation == 1:
        return kernel
    kh, kw = kernel.shape[-2:]
    out = kernel.new_zeros((*kernel.shape[:-2], dilation * (kh - 1) + 1, dilation * (kw - 1) + 1))
    out[..., ::dilation, ::dilation] = kernel
    return out


def pad_kernel_to(kernel: Tensor, size: int | tuple[int, int]) -> Tensor:
    """Zero-pad a ``[..., h, w]`` kernel symmetrically to ``size`` so the centres coincide.

    Both the kernel and the target must have odd sides (or differ by an even amount) for the centres to
    line up; anything else is a programming error and raises ``ValueError``.
    """
    th, tw = (size, size) if isinstance(size, int) else size
    kh, kw = kernel.shape[-2:]
    dh, dw = th - kh, tw - kw
    if dh < 0 or dw < 0 or dh % 2 or dw % 2:
        raise ValueError(f"cannot centre-pad a {kh}x{kw} kernel to {th}x{tw}")
    if dh == dw == 0:
        return kernel
    return torch.nn.functional.pad(kernel, (dw // 2, dw // 2, dh // 2, dh // 2))


def merge_dilated_into_large_kernel(
    large_kernel: Tensor,
    large_bias: Tensor,
    branches: Iterable[tuple[Tensor, Tensor, int]],
) -> tuple[Tensor, Tensor]:
    """Add dilated small-kernel branches ``(kernel, bias, dilation)`` into one large kernel.

    Each branch kernel is expanded to its dense equivalent (:func:`dilate_kernel`), centre-padded to the
    large kernel's size (:func:`pad_kernel_to`) and added; biases add. All inputs are assumed to be
    already BN-fused. Returns ``(kernel, bias)`` in the dtype of ``large_kernel``.
    """
    kernel, bias = large_kernel, large_bias
    size = tuple(large_kernel.shape[-2:])
    for k, b, r in branches:
        kernel = kernel + pad_kernel_to(dilate_kernel(k.to(kernel.dtype), r), size)
        bias = bias + b.to(bias.dtype)
    return kernel, bias


def reparameterize(model: nn.Module) -> nn.Module:
    """Re-parameterise, in place, every block of ``model`` that knows how (has ``reparameterize()``).

    Works on any module tree containing our blocks (a backbone, a Perceiver, a user's own network).
    Parents are visited before children, so a block that merges its sub-blocks itself sees them in
    training form; calls are idempotent, so a child visited afterwards is a no-op. Containers whose own
    ``reparameterize()`` delegates here mark themselves with ``_reparameterize_walks_children = True``.
    Returns ``model``.
    """
    for module in list(model.modules()):
        if getattr(module, "_reparameterize_walks_children", False):
            continue  # a container whose own reparameterize() is this walk
        fn = getattr(module, "reparameterize", None)
        if callable(fn):
            fn()
    return model
