"""The UniRepLKNet block: large-kernel depthwise mixing, SE, GRN feed-forward, layer scale.

``out = x + drop_path(gamma ⊙ pwconv2(GRN(GELU(pwconv1(SE(BN(dwconv(x))))))))``. Module and parameter
names follow the official code, so the state dict of this block *is* the official one, in both forms.
:meth:`UniRepLKNetBlock.reparameterize` folds every BatchNorm, the GRN ``beta`` and the layer scale
into the neighbouring linear maps (official deploy keys), leaving outputs unchanged.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from ..ops.depthwise import _is_tracing
from ..ops.fused import conv1x1, conv1x1_add_, linear_gelu_nchw, onednn_fusion_available
from .dilated_reparam import (
    DILATED_BRANCHES,
    DilatedReparamBlock,
    depthwise_conv,
    make_batchnorm,
    replace_conv_with_bias,
)
from .drop import DropPath
from .norm import GRN, _spatial_sum, batch_norm_scaled
from .reparam import compute_dtype, fuse_bn

__all__ = ["SUPPORTED_KERNEL_SIZES", "Permute", "SEBlock", "UniRepLKNetBlock"]

#: deploy-form CPU inference runs the feed-forward this many bytes of hidden activations at a time, for maps
#: whose hidden tensor is at least ``_FFN_CHUNK_MIN_SAMPLE_BYTES`` per sample (see ``UniRepLKNetBlock._ffn_chunk``)
_FFN_CHUNK_BYTES = 4 << 20
_FFN_CHUNK_MIN_SAMPLE_BYTES = 3 << 19  # 1.5 MiB

#: kernel sizes the block accepts: 0 (no spatial mixing), 3 and 5 (plain conv), 7..17 odd (dilated reparam)
SUPPORTED_KERNEL_SIZES: tuple[int, ...] = (0, 3, 5, *sorted(k for k in DILATED_BRANCHES if k >= 7))


class Permute(nn.Module):
    """``x.permute(*dims)`` as a parameter-free module (keeps the official Sequential indices)."""

    def __init__(self, *dims: int) -> None:
        super().__init__()
        self.dims = dims

    def forward(self, x: Tensor) -> Tensor:
        return x.permute(*self.dims)

    def extra_repr(self) -> str:
        return f"dims={self.dims}"


class SEBlock(nn.Module):
    """Squeeze-and-excitation: avg-pool → 1×1 conv → ReLU → 1×1 conv → sigmoid → channel scale."""

    def __init__(self, channels: int, hidden: int) -> None:
        super().__init__()
        self.down = nn.Conv2d(channels, hidden, 1, bias=True)
        self.up = nn.Conv2d(hidden, channels, 1, bias=True)

    def forward(self, x: Tensor, inplace: bool = False) -> Tensor:
        """``inplace=True`` (inference only, for a temporary ``x`` nobody else reads) scales ``x`` in place."""
        s = (_spatial_sum(x) / (x.shape[2] * x.shape[3]))[:, :, None, None]  # the mean, as a GEMM on channels-last
        s = torch.sigmoid(self.up(F.relu(self.down(s))))
        return x.mul_(s) if inplace else x * s


class UniRepLKNetBlock(nn.Module):
    """One residual block of UniRepLKNet.

    Without autograd the block scales its own temporaries in place (SE on the dwconv/norm output, GRN on the
    GELU output), measured 3 % faster for UniRepLKNet-A at batch 32 on CPU. Forward hooks on ``dwconv``/``norm``
    that keep their output would then see it scaled: set ``inplace_inference = False`` on the block (or the
    class) to keep every intermediate intact.

    Args:
        dim: channels.
        kernel_size: 0, 3, 5 or odd 7–17 (see :data:`SUPPORTED_KERNEL_SIZES`).
        drop_path: stochastic-depth rate of the residual branch.
        layer_scale_init_value: initial layer scale; ``None`` or ``<= 0`` disables it.
        deploy: build the re-parameterised form directly.
        with_cp: run the residual function under activation checkpointing when training.
        use_sync_bn: ``SyncBatchNorm`` instead of ``BatchNorm2d`` (same keys).
        ffn_factor: hidden width of the feed-forward as a multiple of ``dim``.
    """

    inplace_inference: bool = True

    def __init__(
        self,
        dim: int,
        kernel_size: int,
        drop_path: float = 0.0,
        layer_scale_init_value: float | None = 1e-6,
        deploy: bool = False,
        with_cp: bool = False,
        use_sync_bn: bool = False,
        ffn_factor: int = 4,
    ) -> None:
        super().__init__()
        if kernel_size not in SUPPORTED_KERNEL_SIZES:
            raise ValueError(
                f"UniRepLKNetBlock kernel_size must be one of {SUPPORTED_KERNEL_SIZES}, got {kernel_size}"
            )
        self.with_cp = with_cp
        self.kernel_size = kernel_size
        self.dwconv: nn.Module
        if kernel_size == 0:
            self.dwconv = nn.Identity()
        elif kernel_size >= 7:
            self.dwconv = DilatedReparamBlock(dim, kernel_size, deploy=deploy, use_sync_bn=use_sync_bn)
        else:
            self.dwconv = depthwise_conv(dim, kernel_size, bias=deploy)
        self.norm: nn.Module = nn.Identity() if deploy or kernel_size == 0 else make_batchnorm(dim, use_sync_bn)
        self.se = SEBlock(dim, dim // 4)
        hidden = int(ffn_factor * dim)
        self.pwconv1 = nn.Sequential(Permute(0, 2, 3, 1), nn.Linear(dim, hidden))
        self.act = nn.Sequential(nn.GELU(), GRN(hidden, use_bias=not deploy))
        if deploy:
            self.pwconv2 = nn.Sequential(nn.Linear(hidden, dim, bias=True), Permute(0, 3, 1, 2))
        else:
            self.pwconv2 = nn.Sequential(
                nn.Linear(hidden, dim, bias=False), Permute(0, 3, 1, 2), make_batchnorm(dim, use_sync_bn)
            )
        use_ls = not deploy and layer_scale_init_value is not None and layer_scale_init_value > 0
        self.gamma: nn.Parameter | None = (
            nn.Parameter(layer_scale_init_value * torch.ones(dim)) if use_ls else None  # type: ignore[operator]
        )
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()

    def residual(self, x: Tensor) -> Tensor:
        """The residual branch ``F(x)`` (without the skip connection).

        Same maths as the official NHWC formulation (``pwconv1``/``pwconv2`` Linears on permuted views), run
        channels-first: the Linears are applied as 1×1 convolutions of their own weights and GRN reduces over
        dims (2, 3). On channels-last tensors this avoids every permute copy and lets oneDNN's 1×1 conv (about
        twice the speed of the Linear's GEMM at these shapes on CPU) do the pointwise work. The module tree and
        the state-dict keys are the official ones.
        """
        # inference: scale the block's own temporaries in place (saves a full-size allocation and write each)
        inplace = self.inplace_inference and not torch.is_grad_enabled() and not (
            torch.jit.is_tracing() or torch.compiler.is_compiling()
        )
        y = self.norm(self.dwconv(x))
        y = self.se(y, inplace=inplace and y is not x)
        lin1: nn.Linear = self.pwconv1[1]
        if isinstance(self.act[0], nn.GELU) and self.act[0].approximate == "none":
            y = linear_gelu_nchw(y, lin1.weight, lin1.bias)  # one oneDNN op in CPU inference
        else:
            y = self.act[0](conv1x1(y, lin1.weight[:, :, None, None], lin1.bias))
        y = self.act[1].forward_channels_first(y, inplace=inplace)
        lin2: nn.Linear = self.pwconv2[0]
        y = F.conv2d(y, lin2.weight[:, :, None, None], lin2.bias)
        if len(self.pwconv2) == 3:
            y = batch_norm_scaled(self.pwconv2[2], y, self.gamma)  # BN then layer scale, as one BN
        elif self.gamma is not None:
            y = y * self.gamma.view(1, -1, 1, 1)
        return self.drop_path(y)

    def _forward(self, x: Tensor) -> Tensor:
        chunk = self._ffn_chunk(x)
        if chunk:
            return self._forward_ffn_chunked(x, chunk)
        return x + self.residual(x)

    def _ffn_chunk(self, x: Tensor) -> int:
        """Samples per feed-forward chunk in deploy-form CPU inference (0: run the whole batch at once).

        The feed-forward's hidden tensor is 4× the block's width (64 MB for UniRepLKNet-A's first stage at
        batch 32): written by the fused 1×1 conv + GELU, read for GRN's norms, scaled, read by the second 1×1
        conv, each time through memory. GRN's statistics are per sample, so the feed-forward can run a few
        samples at a time with the hidden chunk (~4 MB) staying in cache; the residual add is fused into the
        second conv. Only for maps whose hidden tensor is at least 1.5 MiB per sample: UniRepLKNet-A's first stage
        at 224² (46 → 40 ms per block at batch 32, 2-core AVX2 EPYC, interleaved A/B); at its second stage
        (1 MB per sample) every chunk size was slower (41 → 45-56 ms).
        """
        lin1: nn.Linear = self.pwconv1[1]
        if not (
            self.inplace_inference and not torch.is_grad_enabled() and not _is_tracing()
            and len(self.pwconv2) == 2 and self.gamma is None and not self.act[1].use_bias
            and (not self.training or isinstance(self.drop_path, nn.Identity))
            and isinstance(self.act[0], nn.GELU) and self.act[0].approximate == "none"
            and x.device.type == "cpu" and x.dtype == torch.float32 and x.dim() == 4
            and x.is_contiguous(memory_format=torch.channels_last) and onednn_fusion_available()
        ):
            return 0
        per_sample = lin1.out_features * x.shape[2] * x.shape[3] * x.element_size()
        if per_sample < _FFN_CHUNK_MIN_SAMPLE_BYTES:
            return 0
        chunk = max(1, _FFN_CHUNK_BYTES // per_sample)
        return chunk if chunk < x.shape[0] else 0

    def _forward_ffn_chunked(self, x: Tensor, chunk: int) -> Tensor:
        """``x + residual(x)`` with the feed-forward run ``chunk`` samples at a time (see :meth:`_ffn_chunk`)."""
        y = self.norm(self.dwconv(x))
        y = self.se(y, inplace=y is not x)
        lin1: nn.Linear = self.pwconv1[1]
        lin2: nn.Linear = self.pwconv2[0]
        out = torch.empty_like(x, memory_format=torch.channels_last)
        for i in range(0, x.shape[0], chunk):
            h = linear_gelu_nchw(y[i : i + chunk], lin1.weight, lin1.bias)
            h = self.act[1].forward_channels_first(h, inplace=True)
            conv1x1_add_(out[i : i + chunk].copy_(x[i : i + chunk]), h, lin2.weight, lin2.bias)
        return out

    def forward(self, x: Tensor) -> Tensor:
        if self.with_cp and x.requires_grad and torch.is_grad_enabled():
            return checkpoint(self._forward, x, use_reentrant=False)
        return self._forward(x)

    @property
    def is_reparameterized(self) -> bool:
        """True when the block holds only the deploy-form parameters."""
        return len(self.pwconv2) == 2 and not isinstance(self.norm, nn.modules.batchnorm._BatchNorm)

    @torch.no_grad()
    def reparameterize(self) -> None:
        """Fold, in place, dwconv branches, BatchNorms, GRN beta and layer scale (idempotent).

        Yields exactly the official deploy-form parameters: ``dwconv[.lk_origin].weight/bias``,
        GRN ``gamma`` only, ``pwconv2.0.weight/bias``; no ``norm``, ``gamma`` or ``pwconv2.2``.
        """
        # every fold runs in the compute dtype and is cast back once, so bf16 models round only once
        if isinstance(self.norm, nn.modules.batchnorm._BatchNorm):
            if isinstance(self.dwconv, DilatedReparamBlock):
                kernel, bias = self.dwconv.merged_kernel()
                self.dwconv.install_merged(*fuse_bn(kernel, self.norm, bias))
            else:
                conv = self.dwconv
                self.dwconv = replace_conv_with_bias(conv, *fuse_bn(conv.weight, self.norm, conv.bias))
            self.norm = nn.Identity()
        elif isinstance(self.dwconv, DilatedReparamBlock):
            self.dwconv.reparameterize()
        if len(self.pwconv2) == 3:
            linear: nn.Linear = self.pwconv2[0]
            bn: nn.BatchNorm2d = self.pwconv2[2]
            grn: GRN = self.act[1]
            dt = compute_dtype(linear.weight.dtype)
            w2 = linear.weight.detach().to(dt)
            lin_bias = torch.zeros(w2.shape[0], dtype=dt, device=w2.device)
            if linear.bias is not None:
                lin_bias = lin_bias + linear.bias.detach().to(dt)
            if grn.beta is not None:
                lin_bias = lin_bias + w2 @ grn.beta.detach().to(dt).flatten()
            weight, bias = fuse_bn(w2, bn, lin_bias)
            if self.gamma is not None:
                g = self.gamma.detach().to(dt)
                weight, bias = weight * g[:, None], bias * g
            new = nn.Linear(linear.in_features, linear.out_features, bias=True,
                            device=linear.weight.device, dtype=linear.weight.dtype)
            new.weight.copy_(weight)
            new.bias.copy_(bias)
            self.pwconv2 = nn.Sequential(new, self.pwconv2[1])
            grn.beta = None
            self.gamma = None
