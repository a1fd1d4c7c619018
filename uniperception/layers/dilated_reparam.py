"""The Dilated Reparam Block: a large depthwise kernel trained beside dilated small kernels.

In training form the block sums BatchNorm'd outputs of a non-dilated ``k×k`` depthwise conv
(``lk_origin`` + ``origin_bn``) and of parallel dilated small-kernel depthwise convs
(``dil_conv_k{kb}_{r}`` + ``dil_bn_k{kb}_{r}``). :meth:`DilatedReparamBlock.reparameterize` merges them
into the single ``lk_origin`` conv (with bias) that the deploy form holds; the outputs are identical up to
float rounding. The branch table is data (:data:`DILATED_BRANCHES`), taken from the official code.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..ops import DepthwiseConv2d
from .reparam import fuse_bn, merge_dilated_into_large_kernel

__all__ = ["DILATED_BRANCHES", "DilatedReparamBlock", "make_batchnorm", "replace_conv_with_bias"]

#: large kernel size -> ordered (small kernel size, dilation) branches; order = state-dict order.
DILATED_BRANCHES: dict[int, tuple[tuple[int, int], ...]] = {
    17: ((5, 1), (9, 2), (3, 4), (3, 5), (3, 7)),
    15: ((5, 1), (7, 2), (3, 3), (3, 5), (3, 7)),
    13: ((5, 1), (7, 2), (3, 3), (3, 4), (3, 5)),
    11: ((5, 1), (5, 2), (3, 3), (3, 4), (3, 5)),
    9: ((5, 1), (5, 2), (3, 3), (3, 4)),
    7: ((5, 1), (3, 2), (3, 3)),
    5: ((3, 1), (3, 2)),
}


def make_batchnorm(channels: int, use_sync_bn: bool = False) -> nn.BatchNorm2d | nn.SyncBatchNorm:
    """A BatchNorm2d (or SyncBatchNorm; identical keys) with PyTorch defaults (eps 1e-5)."""
    return nn.SyncBatchNorm(channels) if use_sync_bn else nn.BatchNorm2d(channels)


def depthwise_conv(channels: int, kernel_size: int, dilation: int = 1, bias: bool = False) -> DepthwiseConv2d:
    """A stride-1 "same"-padded depthwise conv (odd kernel) running through :mod:`uniperception.ops`."""
    return DepthwiseConv2d(channels, kernel_size, padding="same", dilation=dilation, bias=bias)


@torch.no_grad()
def replace_conv_with_bias(conv: nn.Conv2d, weight: Tensor, bias: Tensor) -> nn.Conv2d:
    """A copy of ``conv``'s geometry holding ``weight`` and a ``bias``, in ``conv``'s dtype and device.

    Depthwise convs stay :class:`~uniperception.ops.DepthwiseConv2d` (keeping their ``impl`` setting).
    """
    kw = dict(device=conv.weight.device, dtype=conv.weight.dtype)
    new: nn.Conv2d
    if isinstance(conv, DepthwiseConv2d):
        new = DepthwiseConv2d(conv.in_channels, conv.kernel_size, padding=conv.padding,  # type: ignore[arg-type]
                              dilation=conv.dilation, bias=True, impl=conv.impl, **kw)  # type: ignore[arg-type]
    else:
        new = nn.Conv2d(
            conv.in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride, padding=conv.padding,
            dilation=conv.dilation, groups=conv.groups, bias=True, **kw,
        )
    new.weight.copy_(weight.to(conv.weight.dtype))
    new.bias.copy_(bias.to(conv.weight.dtype))
    new.train(conv.training)
    return new


class DilatedReparamBlock(nn.Module):
    """Depthwise ``k×k`` spatial mixing with dilated small-kernel branches (``k`` in 5, 7, …, 17).

    Args:
        channels: number of channels (the conv is depthwise).
        kernel_size: the large kernel size, a key of :data:`DILATED_BRANCHES`.
        deploy: build the merged form directly (``lk_origin`` with bias, no branches).
        use_sync_bn: use ``SyncBatchNorm`` (same keys).
    """

    def __init__(self, channels: int, kernel_size: int, deploy: bool = False, use_sync_bn: bool = False) -> None:
        super().__init__()
        if kernel_size not in DILATED_BRANCHES:
            raise ValueError(
                f"DilatedReparamBlock supports kernel sizes {sorted(DILATED_BRANCHES)}, got {kernel_size}"
            )
        self.channels = channels
        self.kernel_size = kernel_size
        self.branches = DILATED_BRANCHES[kernel_size]
        self.lk_origin = depthwise_conv(channels, kernel_size, bias=deploy)
        if not deploy:
            self.origin_bn = make_batchnorm(channels, use_sync_bn)
            for kb, r in self.branches:
                self.add_module(f"dil_conv_k{kb}_{r}", depthwise_conv(channels, kb, dilation=r))
                self.add_module(f"dil_bn_k{kb}_{r}", make_batchnorm(channels, use_sync_bn))

    @property
    def is_merged(self) -> bool:
        """True once the branches have been merged into ``lk_origin`` (deploy form)."""
        return not hasattr(self, "origin_bn")

    def forward(self, x: Tensor) -> Tensor:
        if self.is_merged:
            return self.lk_origin(x)
        out = self.origin_bn(self.lk_origin(x))
        for kb, r in self.branches:
            out = out + getattr(self, f"dil_bn_k{kb}_{r}")(getattr(self, f"dil_conv_k{kb}_{r}")(x))
        return out

    def merged_kernel(self) -> tuple[Tensor, Tensor]:
        """The ``(weight, bias)`` of the single conv equivalent to this block, in the compute dtype."""
        if self.is_merged:
            return self.lk_origin.weight.detach(), self.lk_origin.bias.detach()
        kernel, bias = fuse_bn(self.lk_origin.weight, self.origin_bn, self.lk_origin.bias)
        branches = []
        for kb, r in self.branches:
            conv: nn.Conv2d = getattr(self, f"dil_conv_k{kb}_{r}")
            k, b = fuse_bn(conv.weight, getattr(self, f"dil_bn_k{kb}_{r}"), conv.bias)
            branches.append((k, b, r))
        return merge_dilated_into_large_kernel(kernel, bias, branches)

    @torch.no_grad()
    def reparameterize(self) -> None:
        """Merge every branch into ``lk_origin`` in place (idempotent)."""
        if not self.is_merged:
            self.install_merged(*self.merged_kernel())

    @torch.no_grad()
    def install_merged(self, kernel: Tensor, bias: Tensor) -> None:
        """Replace the branches by one ``lk_origin`` conv holding ``kernel`` and ``bias`` (cast once)."""
        self.lk_origin = replace_conv_with_bias(self.lk_origin, kernel, bias)
        if not self.is_merged:
            del self.origin_bn
            for kb, r in self.branches:
                delattr(self, f"dil_conv_k{kb}_{r}")
                delattr(self, f"dil_bn_k{kb}_{r}")

    # official name
    merge_dilated_branches = reparameterize

    def extra_repr(self) -> str:
        return f"channels={self.channels}, kernel_size={self.kernel_size}, merged={self.is_merged}"
