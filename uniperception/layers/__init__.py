"""Reusable blocks and the re-parameterisation algebra shared by every backbone."""

from .dilated_reparam import DILATED_BRANCHES, DilatedReparamBlock
from .drop import DropPath, drop_path
from .norm import GRN, LayerNorm2d
from .reparam import (
    dilate_kernel,
    fuse_bn,
    fuse_conv_bn,
    merge_dilated_into_large_kernel,
    pad_kernel_to,
    reparameterize,
)
from .replknet_blocks import ConvBN, ConvFFN, ReparamLargeKernelConv, RepLKBlock, RepLKNetStage
from .slak_blocks import SLaKBlock, SLaKLargeKernelConv
from .unireplknet_block import SUPPORTED_KERNEL_SIZES, Permute, SEBlock, UniRepLKNetBlock

__all__ = [
    "DILATED_BRANCHES",
    "GRN",
    "SUPPORTED_KERNEL_SIZES",
    "ConvBN",
    "ConvFFN",
    "DilatedReparamBlock",
    "DropPath",
    "LayerNorm2d",
    "Permute",
    "RepLKBlock",
    "RepLKNetStage",
    "ReparamLargeKernelConv",
    "SEBlock",
    "SLaKBlock",
    "SLaKLargeKernelConv",
    "UniRepLKNetBlock",
    "dilate_kernel",
    "drop_path",
    "fuse_bn",
    "fuse_conv_bn",
    "merge_dilated_into_large_kernel",
    "pad_kernel_to",
    "reparameterize",
]
