"""The Triton depthwise kernel: checked on CPU through Triton's interpreter, and on CUDA when present."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

pytest.importorskip("triton")

SCRIPT = textwrap.dedent(
    """
    import torch, torch.nn.functional as F
    from uniperception.ops.triton_dw import triton_depthwise_conv2d
    torch.manual_seed(0)
    worst = 0.0
    cases = [(2, 3, 9, 11, 5, 5, 2, 2, 1), (1, 2, 7, 7, 13, 13, 6, 6, 1), (2, 2, 10, 8, 3, 3, 2, 2, 2),
             (1, 2, 12, 9, 7, 3, 3, 1, 1), (1, 1, 6, 6, 3, 3, 4, 4, 1)]
    for b, c, h, w, kh, kw, ph, pw, d in cases:
        x = torch.randn(b, c, h, w, requires_grad=True)
        wt = torch.randn(c, 1, kh, kw, requires_grad=True)
        bias = torch.randn(c, requires_grad=True)
        ref = F.conv2d(x, wt, bias, 1, (ph, pw), d, c)
        out = triton_depthwise_conv2d(x, wt, bias, (ph, pw), (d, d))
        assert out.shape == ref.shape, (out.shape, ref.shape)
        g = torch.randn_like(ref)
        for a, r in zip(torch.autograd.grad(out, (x, wt, bias), g), torch.autograd.grad(ref, (x, wt, bias), g)):
            worst = max(worst, ((a - r).abs().max() / r.abs().max()).item())
        worst = max(worst, ((out - ref).abs().max() / ref.abs().max()).item())
    print(worst)
    """
)


def test_triton_kernel_exact_under_interpreter():
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    out = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=600, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    assert float(out.stdout.strip().splitlines()[-1]) <= 1e-4


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("k", [13, 31, 51])
def test_triton_on_cuda(dtype, tol, k):
    import torch.nn.functional as F

    from uniperception.ops import depthwise_conv2d

    x = torch.randn(4, 32, 56, 56, device="cuda", dtype=dtype, requires_grad=True)
    w = (torch.randn(32, 1, k, k, device="cuda") / k).to(dtype).requires_grad_()
    ref = F.conv2d(x.float(), w.float(), None, 1, k // 2, 1, 32)
    out = depthwise_conv2d(x, w, padding=k // 2, impl="triton")
    assert ((out.float() - ref).abs().max() / ref.abs().max()).item() <= tol
    g = torch.randn_like(ref)
    ga = torch.autograd.grad(out.float(), (x, w), g)
    gr = torch.autograd.grad(ref, (x, w), g)
    for a, r in zip(ga, gr, strict=True):
        assert ((a.float() - r.float()).abs().max() / r.float().abs().max()).item() <= tol


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_autotune_on_cuda_times_to_completion(monkeypatch):
    from uniperception import ops
    from uniperception.ops import depthwise as dw

    calls = []
    real = torch.cuda.synchronize
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: (calls.append(1), real(*a))[1])
    ops.set_autotune(True)
    try:
        x = torch.randn(2, 8, 20, 20, device="cuda")
        w = torch.randn(8, 1, 13, 13, device="cuda")
        y = ops.depthwise_conv2d(x, w, padding=6)
        choice = next(iter(dw._AUTOTUNE_CACHE.values()))
    finally:
        ops.set_autotune(False)
    assert choice in ops.available_impls("cuda") and calls  # every timed call was synchronised
    ref = torch.nn.functional.conv2d(x, w, None, 1, 6, 1, 8)
    assert ((y - ref).abs().max() / ref.abs().max()).item() <= 1e-4
