"""SLaK building blocks: the decomposed large kernel and the ConvNeXt-style block.

The decomposed kernel sums a tall ``M×N`` (``LoRA1``), a wide ``N×M`` (``LoRA2``) and, when ``N < M``, a small
``N×N`` (``small_conv``) depthwise conv, each followed by its own BatchNorm (SLaK spec §4.1). Every branch is
"same"-padded **per axis** — ``(kh//2, kw//2)`` — which is what the official CUDA op computes whatever padding
the official module passes it (spec §4.2); this is also what :class:`~uniperception.ops.DepthwiseConv2d`
does with ``padding="same"``, so the official outputs are reproduced exactly.

Three forms of the large-kernel module, all with names from the official code:

* ``"train"``: ``LoRA1.{conv,bn}``, ``LoRA2.{conv,bn}``, ``small_conv.{conv,bn}`` (released checkpoints);
  ``Decom=False`` builds ``lkb_origin.{conv,bn}`` + ``small_conv.{conv,bn}`` instead (RepLKNet style).
* ``"rect"`` (inference, not in the official code): the same rectangular branches with each BN folded into its
  conv; keys are the training-form conv keys plus a bias each — ``LoRA1.conv.{weight,bias}``,
  ``LoRA2.conv.{weight,bias}``, ``small_conv.conv.{weight,bias}`` (the official ``deep_fuse_BN`` convention:
  ``….conv.weight``/``….conv.bias``, no ``….bn.*``). No other keys.
* ``"dense"`` (inference; ``deploy=True``): one merged ``L×L`` kernel, ``lkb_reparam.{weight,bias}`` (RepLKNet's
  deploy convention), ``L = max(M, N)``. The rectangles are zero-padded to the square around their centres.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from ..errors import InvalidInputError
from ..ops import DepthwiseConv2d
from .drop import DropPath
from .reparam import pad_kernel_to
from .replknet_blocks import ConvBN, check_odd

__all__ = ["FORMS", "SLaKBlock", "SLaKLargeKernelConv"]

#: the forms of :class:`SLaKLargeKernelConv`, in the order re-parameterisation moves through them
FORMS: tuple[str, ...] = ("train", "rect", "dense")


class SLaKLargeKernelConv(nn.Module):
    """SLaK's large-kernel module (official class ``ReparamLargeKernelConv`` of ``models/SLaK.py``).

    Args:
        channels: channels (every conv is depthwise, stride 1).
        kernel_size: the long side ``M`` (odd).
        small_kernel: the short side ``N`` (odd); the small ``N×N`` branch exists only when ``N < M``.
        decom: decomposed rectangles (``LoRA1``/``LoRA2``, the released models) or a dense ``M×M``
            ``lkb_origin`` (``Decom=False``).
        bn: a BatchNorm after every branch conv (``--bn``).
        deploy: build the merged dense form directly (``lkb_reparam`` with bias).
        use_sync_bn: ``SyncBatchNorm`` (same keys).
    """

    def __init__(
        self,
        channels: int,
        kernel_size: int,
        small_kernel: int,
        decom: bool = True,
        bn: bool = True,
        deploy: bool = False,
        use_sync_bn: bool = False,
    ) -> None:
        super().__init__()
        check_odd(kernel_size)
        if decom or small_kernel < kernel_size:  # the short side is unused otherwise (ConvNeXt baseline: 100)
            check_odd(small_kernel)
        self.channels, self.kernel_size, self.small_kernel = channels, kernel_size, small_kernel
        self.decom, self.bn = bool(decom), bool(bn)
        #: side of the merged square kernel
        self.merged_size = max(kernel_size, small_kernel) if self.decom else kernel_size
        if deploy:
            self.lkb_reparam = DepthwiseConv2d(channels, self.merged_size, padding="same", bias=True)
            return
        m, n = kernel_size, small_kernel

        def branch(kh: int, kw: int) -> ConvBN:
            return ConvBN(channels, channels, (kh, kw), groups=channels, bn=bn, use_sync_bn=use_sync_bn,
                          dw_engine=True)

        if self.decom:
            self.LoRA1 = branch(m, n)
            self.LoRA2 = branch(n, m)
        else:
            self.lkb_origin = branch(m, m)
        if n < m:
            self.small_conv = branch(n, n)

    # ------------------------------------------------------------------------------------------ forms
    def _branches(self) -> list[ConvBN]:
        return [self._modules[k] for k in ("LoRA1", "LoRA2", "lkb_origin", "small_conv")  # type: ignore[misc]
                if k in self._modules]

    @property
    def form(self) -> str:
        """``"train"``, ``"rect"`` (BN folded, rectangles kept) or ``"dense"`` (one merged kernel)."""
        if "lkb_reparam" in self._modules:
            return "dense"
        return "rect" if all(b.conv.bias is not None and not b.has_bn for b in self._branches()) else "train"

    @property
    def is_merged(self) -> bool:
        """True in the dense deploy form."""
        return "lkb_reparam" in self._modules

    def forward(self, x: Tensor) -> Tensor:
        if "lkb_reparam" in self._modules:
            return self.lkb_reparam(x)
        out: Tensor | None = None
        for b in self._branches():
            y = b(x)
            out = y if out is None else out + y
        assert out is not None
        return out

    def get_equivalent_kernel_bias(self) -> tuple[Tensor, Tensor]:
        """The merged ``(L×L kernel, bias)``, in the compute dtype."""
        if self.is_merged:
            merged: nn.Conv2d = self.lkb_reparam
            assert merged.bias is not None
            return merged.weight.detach(), merged.bias.detach()
        size = (self.merged_size, self.merged_size)
        kernel: Tensor | None = None
        bias: Tensor | None = None
        for b in self._branches():
            k, c = b.fused_kernel_bias()
            k = pad_kernel_to(k, size)
            kernel, bias = (k, c) if kernel is None else (kernel + k, bias + c)  # type: ignore[operator]
        assert kernel is not None and bias is not None
        return kernel, bias

    @torch.no_grad()
    def reparameterize(self, form: str = "dense") -> None:
        """Convert in place to ``form`` (``"dense"`` or ``"rect"``); idempotent.

        ``"rect"`` folds each branch's BN into its conv (a non-decomposed module has no rectangles, so there it
        means ``"dense"``). A dense module cannot go back to rectangles.
        """
        if form not in ("dense", "rect"):
            raise InvalidInputError(f"form must be 'dense' or 'rect', got {form!r}")
        if form == "rect" and not self.decom:
            form = "dense"
        current = self.form
        if current == form:
            return
        if current == "dense":
            raise InvalidInputError(
                "this large kernel is already merged into one dense kernel; the rectangular form cannot be "
                "recovered — re-parameterise a training-form model with form='rect' instead"
            )
        if form == "rect":
            for b in self._branches():
                b.fold_bn()
            return
        ref: nn.Conv2d = self._branches()[0].conv
        kernel, bias = self.get_equivalent_kernel_bias()
        merged = DepthwiseConv2d(self.channels, self.merged_size, padding="same", bias=True,
                                 impl=getattr(ref, "impl", "auto"),
                                 device=ref.weight.device, dtype=ref.weight.dtype)
        merged.weight.copy_(kernel.to(ref.weight.dtype))
        merged.bias.copy_(bias.to(ref.weight.dtype))  # type: ignore[union-attr]
        merged.train(ref.training)
        for name in ("LoRA1", "LoRA2", "lkb_origin", "small_conv"):
            if name in self._modules:
                delattr(self, name)
        self.lkb_reparam = merged

    def extra_repr(self) -> str:
        return (f"channels={self.channels}, kernel=({self.kernel_size}, {self.small_kernel}), decom={self.decom}, "
                f"bn={self.bn}, form={self.form}")


class SLaKBlock(nn.Module):
    """``x + drop_path(gamma ⊙ pwconv2(GELU(pwconv1(LN(LK(x))))))``, LN/Linears on the NHWC view (spec §3).

    Args:
        dim: channels.
        kernel_size: ``(M, N)``: long and short side of the decomposed kernel.
        drop_path: stochastic-depth rate.
        layer_scale_init_value: initial layer scale ``gamma`` (``<= 0``/``None``: no ``gamma``).
        decom, bn, deploy, use_sync_bn: see :class:`SLaKLargeKernelConv`.
        with_cp: activation checkpointing of the block when training.
    """

    def __init__(
        self,
        dim: int,
        kernel_size: tuple[int, int],
        drop_path: float = 0.0,
        layer_scale_init_value: float | None = 1e-6,
        decom: bool = True,
        bn: bool = True,
        deploy: bool = False,
        use_sync_bn: bool = False,
        with_cp: bool = False,
    ) -> None:
        super().__init__()
        self.with_cp = with_cp
        self.large_kernel = SLaKLargeKernelConv(dim, kernel_size[0], kernel_size[1], decom=decom, bn=bn,
                                                deploy=deploy, use_sync_bn=use_sync_bn)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.pwconv1 = nn.Linear(dim, 4 * dim)
        self.act = nn.GELU()
        self.pwconv2 = nn.Linear(4 * dim, dim)
        use_ls = layer_scale_init_value is not None and layer_scale_init_value > 0
        self.gamma: nn.Parameter | None = (
            nn.Parameter(layer_scale_init_value * torch.ones(dim)) if use_ls else None  # type: ignore[operator]
        )
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()

    def residual(self, x: Tensor) -> Tensor:
        """The residual branch (without the skip connection); NCHW in and out, any memory format."""
        y = self.large_kernel(x).permute(0, 2, 3, 1)  # a free view when x is channels-last
        y = F.layer_norm(y, self.norm.normalized_shape, self.norm.weight, self.norm.bias, self.norm.eps)
        y = self.pwconv2(self.act(self.pwconv1(y)))
        if self.gamma is not None:
            y = y * self.gamma
        return self.drop_path(y.permute(0, 3, 1, 2))

    def _forward(self, x: Tensor) -> Tensor:
        return x + self.residual(x)

    def forward(self, x: Tensor) -> Tensor:
        if self.with_cp and x.requires_grad and torch.is_grad_enabled():
            return checkpoint(self._forward, x, use_reentrant=False)
        return self._forward(x)

    def reparameterize(self, form: str = "dense") -> None:
        """Re-parameterise the large kernel (see :meth:`SLaKLargeKernelConv.reparameterize`)."""
        self.large_kernel.reparameterize(form)
