"""RepLKNet building blocks: conv-BN units, the re-parameterisable large kernel, RepLK block, ConvFFN, stage.

Module and attribute names follow the official ``replknet.py`` (``conv``/``bn``/``nonlinear``, ``lkb_origin``,
``small_conv``, ``lkb_reparam``, ``prelkb_bn``, ``pw1``, ``pw2``, ``preffn_bn``, ``blocks``, ``norm``), so the
state dict of these modules *is* the official one, in training and in deploy form. Every stride-1 depthwise
conv of the large-kernel module runs through :class:`uniperception.ops.DepthwiseConv2d`.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from ..errors import InvalidInputError
from ..ops import DepthwiseConv2d
from .dilated_reparam import make_batchnorm, replace_conv_with_bias
from .drop import DropPath
from .reparam import fuse_bn, pad_kernel_to

__all__ = ["ConvBN", "ConvFFN", "RepLKBlock", "RepLKNetStage", "ReparamLargeKernelConv", "check_odd"]


def check_odd(*sizes: int, what: str = "kernel size") -> None:
    """Raise :class:`InvalidInputError` unless every size is a positive odd integer (centre-aligned kernels)."""
    for s in sizes:
        if int(s) != s or s < 1 or s % 2 == 0:
            raise InvalidInputError(f"{what} must be a positive odd integer, got {s}")


class ConvBN(nn.Sequential):
    """``conv`` (no bias) → ``bn`` [→ ``nonlinear``]: the official ``conv_bn`` / ``conv_bn_relu`` units.

    ``bn=False`` leaves only ``conv`` (SLaK's ``--bn false``). Stride-1 depthwise convs are built as
    :class:`~uniperception.ops.DepthwiseConv2d` with "same" padding per axis when ``dw_engine`` is set.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int],
        stride: int = 1,
        padding: int | tuple[int, int] | None = None,
        groups: int = 1,
        relu: bool = False,
        bn: bool = True,
        use_sync_bn: bool = False,
        dw_engine: bool = False,
    ) -> None:
        super().__init__()
        kh, kw = (kernel_size, kernel_size) if isinstance(kernel_size, int) else kernel_size
        if padding is None:
            padding = (kh // 2, kw // 2)
        conv: nn.Conv2d
        if dw_engine:
            if not (in_channels == out_channels == groups and stride == 1):
                raise ValueError("dw_engine needs a stride-1 depthwise conv")
            conv = DepthwiseConv2d(in_channels, (kh, kw), padding=padding, bias=False)
        else:
            conv = nn.Conv2d(in_channels, out_channels, (kh, kw), stride, padding, groups=groups, bias=False)
        self.add_module("conv", conv)
        if bn:
            self.add_module("bn", make_batchnorm(out_channels, use_sync_bn))
        if relu:
            self.add_module("nonlinear", nn.ReLU())

    @property
    def has_bn(self) -> bool:
        """True while the unit still holds its BatchNorm (training form)."""
        return "bn" in self._modules

    def fused_kernel_bias(self) -> tuple[Tensor, Tensor]:
        """``(weight, bias)`` of the conv with the BN folded in, in the compute dtype (no BN: bias 0)."""
        conv: nn.Conv2d = self._modules["conv"]  # type: ignore[assignment]
        if self.has_bn:
            return fuse_bn(conv.weight, self._modules["bn"], conv.bias)  # type: ignore[arg-type]
        w = conv.weight.detach()
        w = w.to(torch.float64 if w.dtype == torch.float64 else torch.float32)
        b = conv.bias.detach().to(w.dtype) if conv.bias is not None else w.new_zeros(w.shape[0])
        return w, b

    @torch.no_grad()
    def fold_bn(self) -> None:
        """Fold the BN into a biased ``conv`` in place (keys ``conv.weight``/``conv.bias``; idempotent).

        Deliberately not called ``fuse``: timm's ``reparameterize_model`` replaces any child that has a ``fuse()``
        by its return value, which would fold every conv-BN and leave the official deploy layout.
        """
        conv: nn.Conv2d = self._modules["conv"]  # type: ignore[assignment]
        if self.has_bn or conv.bias is None:
            self.conv = replace_conv_with_bias(conv, *self.fused_kernel_bias())
            if self.has_bn:
                del self.bn


class ReparamLargeKernelConv(nn.Module):
    """Depthwise ``K×K`` conv-BN plus an optional centred ``k×k`` conv-BN, summed (RepLKNet §4).

    Args:
        channels: channels (the convs are depthwise).
        kernel_size: the large kernel ``K`` (odd).
        small_kernel: the parallel small kernel ``k ≤ K`` (odd), or ``None`` (XL).
        small_kernel_merged: build the deploy form directly (``lkb_reparam`` with bias).
        use_sync_bn: ``SyncBatchNorm`` (same keys).
    """

    def __init__(
        self,
        channels: int,
        kernel_size: int,
        small_kernel: int | None = 5,
        small_kernel_merged: bool = False,
        use_sync_bn: bool = False,
    ) -> None:
        super().__init__()
        check_odd(kernel_size, what="large kernel size")
        if small_kernel is not None:
            check_odd(small_kernel, what="small kernel size")
            if small_kernel > kernel_size:
                raise InvalidInputError(
                    f"the small kernel ({small_kernel}) must not be larger than the large kernel ({kernel_size})"
                )
        self.channels, self.kernel_size, self.small_kernel = channels, kernel_size, small_kernel
        if small_kernel_merged:
            self.lkb_reparam = DepthwiseConv2d(channels, kernel_size, padding="same", bias=True)
        else:
            self.lkb_origin = ConvBN(channels, channels, kernel_size, groups=channels, use_sync_bn=use_sync_bn,
                                     dw_engine=True)
            if small_kernel is not None:
                self.small_conv = ConvBN(channels, channels, small_kernel, groups=channels,
                                         use_sync_bn=use_sync_bn, dw_engine=True)

    @property
    def is_merged(self) -> bool:
        """True in the deploy form (one ``lkb_reparam`` conv)."""
        return "lkb_reparam" in self._modules

    def forward(self, x: Tensor) -> Tensor:
        if self.is_merged:
            return self.lkb_reparam(x)
        out = self.lkb_origin(x)
        if "small_conv" in self._modules:
            out = out + self.small_conv(x)  # no in-place add: keeps ONNX export of the training form working
        return out

    def get_equivalent_kernel_bias(self) -> tuple[Tensor, Tensor]:
        """The merged ``(K×K kernel, bias)``, in the compute dtype (official name)."""
        if self.is_merged:
            merged: nn.Conv2d = self.lkb_reparam
            assert merged.bias is not None
            return merged.weight.detach(), merged.bias.detach()
        k, b = self.lkb_origin.fused_kernel_bias()
        if "small_conv" in self._modules:
            ks, bs = self.small_conv.fused_kernel_bias()
            k = k + pad_kernel_to(ks, (k.shape[-2], k.shape[-1]))
            b = b + bs
        return k, b

    @torch.no_grad()
    def reparameterize(self) -> None:
        """Merge the branches into ``lkb_reparam`` in place (idempotent)."""
        if self.is_merged:
            return
        k, b = self.get_equivalent_kernel_bias()
        self.lkb_reparam = replace_conv_with_bias(self.lkb_origin.conv, k, b)  # type: ignore[assignment]
        del self.lkb_origin
        if "small_conv" in self._modules:
            del self.small_conv

    # official name
    merge_kernel = reparameterize

    def extra_repr(self) -> str:
        return (f"channels={self.channels}, kernel_size={self.kernel_size}, small_kernel={self.small_kernel}, "
                f"merged={self.is_merged}")


class RepLKBlock(nn.Module):
    """``x + drop_path(pw2(ReLU(LK(pw1(prelkb_bn(x))))))`` (RepLKNet §3.1)."""

    def __init__(
        self,
        in_channels: int,
        dw_channels: int,
        block_lk_size: int,
        small_kernel: int | None,
        drop_path: float = 0.0,
        small_kernel_merged: bool = False,
        use_sync_bn: bool = False,
    ) -> None:
        super().__init__()
        self.pw1 = ConvBN(in_channels, dw_channels, 1, relu=True, use_sync_bn=use_sync_bn)
        self.pw2 = ConvBN(dw_channels, in_channels, 1, use_sync_bn=use_sync_bn)
        self.large_kernel = ReparamLargeKernelConv(dw_channels, block_lk_size, small_kernel,
                                                   small_kernel_merged=small_kernel_merged, use_sync_bn=use_sync_bn)
        self.lk_nonlinear = nn.ReLU()
        self.prelkb_bn = make_batchnorm(in_channels, use_sync_bn)
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        out = self.pw1(self.prelkb_bn(x))
        out = self.pw2(self.lk_nonlinear(self.large_kernel(out)))
        return x + self.drop_path(out)


class ConvFFN(nn.Module):
    """``x + drop_path(pw2(GELU(pw1(preffn_bn(x)))))`` with exact GELU (RepLKNet §3.2)."""

    def __init__(
        self,
        in_channels: int,
        internal_channels: int,
        out_channels: int,
        drop_path: float = 0.0,
        use_sync_bn: bool = False,
    ) -> None:
        super().__init__()
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.preffn_bn = make_batchnorm(in_channels, use_sync_bn)
        self.pw1 = ConvBN(in_channels, internal_channels, 1, use_sync_bn=use_sync_bn)
        self.pw2 = ConvBN(internal_channels, out_channels, 1, use_sync_bn=use_sync_bn)
        self.nonlinear = nn.GELU()

    def forward(self, x: Tensor) -> Tensor:
        out = self.pw2(self.nonlinear(self.pw1(self.preffn_bn(x))))
        return x + self.drop_path(out)


class RepLKNetStage(nn.Module):
    """``num_blocks`` (RepLKBlock, ConvFFN) pairs in ``blocks``, plus ``norm`` for the features mode.

    ``drop_path`` is one rate per pair (both blocks of a pair share it). ``norm`` is ``BN(channels)`` with
    ``norm_intermediate_features`` (downstream XL), else ``Identity``; it is applied only to the maps
    returned in features mode.
    """

    def __init__(
        self,
        channels: int,
        num_blocks: int,
        stage_lk_size: int,
        drop_path: float | list[float],
        small_kernel: int | None,
        dw_ratio: float = 1,
        ffn_ratio: float = 4,
        use_checkpoint: bool = False,
        small_kernel_merged: bool = False,
        norm_intermediate_features: bool = False,
        use_sync_bn: bool = False,
    ) -> None:
        super().__init__()
        self.use_checkpoint = use_checkpoint
        rates = drop_path if isinstance(drop_path, list) else [drop_path] * num_blocks
        blks: list[nn.Module] = []
        for i in range(num_blocks):
            blks.append(RepLKBlock(channels, int(channels * dw_ratio), stage_lk_size, small_kernel, rates[i],
                                   small_kernel_merged=small_kernel_merged, use_sync_bn=use_sync_bn))
            blks.append(ConvFFN(channels, int(channels * ffn_ratio), channels, rates[i], use_sync_bn=use_sync_bn))
        self.blocks = nn.ModuleList(blks)
        self.norm: nn.Module = make_batchnorm(channels, use_sync_bn) if norm_intermediate_features else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        ckpt = self.use_checkpoint and x.requires_grad and torch.is_grad_enabled()
        for blk in self.blocks:
            x = checkpoint(blk, x, use_reentrant=False) if ckpt else blk(x)
        return x
