"""A Triton kernel for large depthwise convolutions on CUDA GPUs (forward and both gradients).

Imported only when ``impl="triton"`` is asked for or chosen on a CUDA device, never on CPU-only machines.
One program computes a ``BLOCK_H × BLOCK_W`` output tile of one (sample, channel) plane, looping over the
kernel taps with masked loads, so no padded copy of the input is ever made and taps outside the image cost
nothing; accumulation is in float32 for float32/float16/bfloat16 inputs. The input gradient reuses the
forward kernel (a correlation with the flipped kernel and complementary padding); the weight gradient has
its own kernel that reduces one tap of one channel over batch and space.

The kernels also run under Triton's CPU interpreter (``TRITON_INTERPRET=1``), which is how the test
suite checks them on machines without a GPU.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

__all__ = ["triton_depthwise_conv2d"]


@triton.jit
def _dw_fwd_kernel(
    x_ptr, w_ptr, b_ptr, y_ptr,
    C, H, W, OH, OW, KH, KW, PH, PW, DH, DW,
    HAS_BIAS: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr,
):
    plane = tl.program_id(0)
    c = plane % C
    oh = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)[:, None]
    ow = tl.program_id(2) * BLOCK_W + tl.arange(0, BLOCK_W)[None, :]
    acc = tl.zeros((BLOCK_H, BLOCK_W), dtype=tl.float32)
    x_base = x_ptr + plane.to(tl.int64) * H * W
    w_base = w_ptr + c * KH * KW
    for i in range(KH):
        ih = oh - PH + i * DH
        row_ok = (ih >= 0) & (ih < H)
        for j in range(KW):
            iw = ow - PW + j * DW
            m = row_ok & (iw >= 0) & (iw < W)
            xv = tl.load(x_base + ih * W + iw, mask=m, other=0.0).to(tl.float32)
            wv = tl.load(w_base + i * KW + j).to(tl.float32)
            acc += xv * wv
    if HAS_BIAS:
        acc += tl.load(b_ptr + c).to(tl.float32)
    out_ok = (oh < OH) & (ow < OW)
    tl.store(y_ptr + plane.to(tl.int64) * OH * OW + oh * OW + ow, acc.to(y_ptr.dtype.element_ty), mask=out_ok)


@triton.jit
def _dw_wgrad_kernel(
    x_ptr, gy_ptr, gw_ptr,
    B, C, H, W, OH, OW, KH, KW, PH, PW, DH, DW,
    BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr,
):
    c = tl.program_id(0)
    tap = tl.program_id(1)
    i = tap // KW
    j = tap % KW
    acc = tl.zeros((BLOCK_H, BLOCK_W), dtype=tl.float32)
    for b in range(B):
        plane = (b * C + c).to(tl.int64)
        for oh0 in range(0, OH, BLOCK_H):
            oh = oh0 + tl.arange(0, BLOCK_H)[:, None]
            ih = oh - PH + i * DH
            for ow0 in range(0, OW, BLOCK_W):
                ow = ow0 + tl.arange(0, BLOCK_W)[None, :]
                iw = ow - PW + j * DW
                m = (oh < OH) & (ow < OW) & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
                g = tl.load(gy_ptr + plane * OH * OW + oh * OW + ow, mask=m, other=0.0).to(tl.float32)
                xv = tl.load(x_ptr + plane * H * W + ih * W + iw, mask=m, other=0.0).to(tl.float32)
                acc += g * xv
    tl.store(gw_ptr + c * KH * KW + tap, tl.sum(tl.sum(acc, axis=1), axis=0))


def _block(n: int) -> int:
    return max(4, min(32, triton.next_power_of_2(n)))


def _forward(x: Tensor, w: Tensor, b: Tensor | None, padding: tuple[int, int], dilation: tuple[int, int]) -> Tensor:
    bsz, c, h, wd = x.shape
    kh, kw = w.shape[-2:]
    oh = h + 2 * padding[0] - dilation[0] * (kh - 1)
    ow = wd + 2 * padding[1] - dilation[1] * (kw - 1)
    y = torch.empty((bsz, c, oh, ow), device=x.device, dtype=x.dtype)
    bh, bw = _block(oh), _block(ow)
    grid = (bsz * c, triton.cdiv(oh, bh), triton.cdiv(ow, bw))
    _dw_fwd_kernel[grid](
        x, w, b if b is not None else w, y,
        c, h, wd, oh, ow, kh, kw, padding[0], padding[1], dilation[0], dilation[1],
        HAS_BIAS=b is not None, BLOCK_H=bh, BLOCK_W=bw,
    )
    return y


class _TritonDepthwise(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w, b, padding, dilation):  # type: ignore[override]
        x, w = x.contiguous(), w.contiguous()
        ctx.save_for_backward(x, w)
        ctx.padding, ctx.dilation, ctx.has_bias = padding, dilation, b is not None
        return _forward(x, w, b.contiguous() if b is not None else None, padding, dilation)

    @staticmethod
    def backward(ctx, gy):  # type: ignore[override]
        x, w = ctx.saved_tensors
        gy = gy.contiguous()
        (ph, pw), (dh, dw) = ctx.padding, ctx.dilation
        kh, kw = w.shape[-2:]
        gx = gw = gb = None
        if ctx.needs_input_grad[0]:
            # correlation of the output gradient with the flipped kernel, complementary padding
            gx = _forward(gy, w.flip(-2, -1).contiguous(), None, (dh * (kh - 1) - ph, dw * (kw - 1) - pw), (dh, dw))
        if ctx.needs_input_grad[1]:
            bsz, c, h, wd = x.shape
            oh, ow = gy.shape[-2:]
            gw32 = torch.empty((c, 1, kh, kw), device=x.device, dtype=torch.float32)
            _dw_wgrad_kernel[(c, kh * kw)](
                x, gy, gw32, bsz, c, h, wd, oh, ow, kh, kw, ph, pw, dh, dw,
                BLOCK_H=_block(oh), BLOCK_W=_block(ow),
            )
            gw = gw32.to(w.dtype)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            gb = gy.sum((0, 2, 3))
        return gx, gw, gb, None, None


def triton_depthwise_conv2d(
    x: Tensor, weight: Tensor, bias: Tensor | None, padding: tuple[int, int], dilation: tuple[int, int]
) -> Tensor:
    """Stride-1 depthwise conv2d through Triton (CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``)."""
    return _TritonDepthwise.apply(x, weight, bias, tuple(padding), tuple(dilation))
