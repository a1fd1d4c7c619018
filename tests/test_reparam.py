"""Structural re-parameterisation: the algebra, each block, and whole models, in several dtypes."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from _utils import max_rel_err, randomize_
from torch import nn

import uniperception as up
from uniperception.backbones import UniRepLKNet
from uniperception.layers import (
    DILATED_BRANCHES,
    SUPPORTED_KERNEL_SIZES,
    DilatedReparamBlock,
    UniRepLKNetBlock,
    dilate_kernel,
    fuse_bn,
    pad_kernel_to,
)

LARGE = sorted(k for k in DILATED_BRANCHES if k >= 7)


# ---------------------------------------------------------------------------------------------- algebra
@pytest.mark.parametrize("k,r", [(3, 2), (3, 5), (5, 2), (7, 2), (9, 2), (3, 7)])
def test_dilate_kernel_equals_dilated_conv(k, r):
    w = torch.randn(4, 1, k, k, dtype=torch.float64)
    x = torch.randn(2, 4, 23, 19, dtype=torch.float64)
    dense = dilate_kernel(w, r)
    assert dense.shape[-1] == r * (k - 1) + 1
    a = F.conv2d(x, w, padding=r * (k - 1) // 2, dilation=r, groups=4)
    b = F.conv2d(x, dense, padding=dense.shape[-1] // 2, groups=4)
    torch.testing.assert_close(a, b, atol=1e-12, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16, torch.float16])
def test_dilate_kernel_is_dtype_agnostic(dtype):
    """The official helper fails on non-float32 kernels (spec §13.7)."""
    w = torch.randn(2, 1, 3, 3).to(dtype)
    d = dilate_kernel(w, 3)
    assert d.dtype == dtype and torch.equal(d[..., ::3, ::3], w) and d.sum() == w.sum()


def test_pad_kernel_to_centres_and_rejects_bad_sizes():
    w = torch.randn(1, 1, 3, 3)
    p = pad_kernel_to(w, 7)
    assert torch.equal(p[..., 2:5, 2:5], w) and torch.count_nonzero(p) == torch.count_nonzero(w)
    with pytest.raises(ValueError):
        pad_kernel_to(w, 4)
    with pytest.raises(ValueError):
        pad_kernel_to(torch.randn(1, 1, 9, 9), 7)


def test_fuse_bn_matches_eval_bn():
    conv = nn.Conv2d(6, 6, 5, padding=2, groups=6, bias=True).double()
    bn = randomize_(nn.BatchNorm2d(6).double(), seed=3).eval()
    x = torch.randn(2, 6, 11, 13, dtype=torch.float64)
    w, b = fuse_bn(conv.weight, bn, conv.bias)
    torch.testing.assert_close(F.conv2d(x, w, b, padding=2, groups=6), bn(conv(x)), atol=1e-12, rtol=0)


# ---------------------------------------------------------------------------------------------- blocks
@pytest.mark.parametrize("k", [*LARGE, 5])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float64, 1e-12)])
def test_dilated_reparam_block_merge(k, dtype, tol):
    blk = randomize_(DilatedReparamBlock(12, k), seed=k).to(dtype).eval()
    x = torch.randn(2, 12, 29, 35, dtype=dtype)
    with torch.no_grad():
        ref = blk(x)
        blk.reparameterize()
        out = blk(x)
    assert blk.is_merged and set(blk.state_dict()) == {"lk_origin.weight", "lk_origin.bias"}
    assert max_rel_err(out, ref) <= tol


@pytest.mark.parametrize("k", SUPPORTED_KERNEL_SIZES)
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.float64, 1e-10)])
def test_block_reparam_every_kernel_size(k, dtype, tol):
    blk = randomize_(UniRepLKNetBlock(16, k), seed=100 + k).to(dtype).eval()
    x = torch.randn(2, 16, 27, 33, dtype=dtype)
    with torch.no_grad():
        ref = blk(x)
        blk.reparameterize()
        out = blk(x)
    assert blk.is_reparameterized
    assert max_rel_err(out, ref) <= tol
    # the reparameterised block has exactly the layout of one built in deploy form
    built = UniRepLKNetBlock(16, k, deploy=True)
    assert {n: v.shape for n, v in blk.state_dict().items()} == {n: v.shape for n, v in built.state_dict().items()}


@pytest.mark.parametrize("k", SUPPORTED_KERNEL_SIZES)
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.float64, 1e-10)])
def test_model_reparam_every_kernel_size(k, dtype, tol):
    """Whole models at sides that are not multiples of 32, random weights *and* BN statistics."""
    ks = ((k,), (k,), (k, 3), (k,))
    m = randomize_(UniRepLKNet(depths=(1, 1, 2, 1), dims=(8, 16, 24, 32), kernel_sizes=ks, num_classes=5), k)
    m = m.to(dtype).eval()
    x = torch.randn(2, 3, 71, 45, dtype=dtype)
    with torch.no_grad():
        ref = m(x)
        m.reparameterize()
        out = m(x)
    assert m.is_deploy
    assert max_rel_err(out, ref) <= tol


def test_reparam_is_idempotent_and_mode_independent():
    m = randomize_(UniRepLKNet(depths=(1, 1, 1, 1), dims=(8, 16, 24, 32),
                               kernel_sizes=((3,), (13,), (17,), (0,)), num_classes=5), 7)
    a = copy.deepcopy(m).train().reparameterize()
    b = copy.deepcopy(m).eval().reparameterize()
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    a.reparameterize()
    up.reparameterize(a)
    assert all(torch.equal(a.state_dict()[k], sb[k]) for k in sb)


def test_bfloat16_reparam_matches_float32_reparam():
    m = randomize_(UniRepLKNet(depths=(1, 1, 1, 1), dims=(8, 16, 24, 32),
                               kernel_sizes=((3,), (13,), (11,), (7,)), num_classes=5), 11)
    bf = m.to(torch.bfloat16)
    # reference: the same (bf16-rounded) weights merged in float32, then rounded once to bf16
    ref = copy.deepcopy(bf).float().reparameterize().state_dict()
    bf.reparameterize()
    for k, v in bf.state_dict().items():
        assert v.dtype == torch.bfloat16
        torch.testing.assert_close(v.float(), ref[k].to(torch.bfloat16).float(), atol=1e-6, rtol=8e-3, msg=k)
    x = torch.randn(1, 3, 40, 40)
    with torch.no_grad():
        out = bf.eval()(x.bfloat16()).float()
    assert torch.isfinite(out).all()


def test_reparameterize_any_module_tree():
    """`uniperception.reparameterize` finds our blocks inside a user's network."""
    net = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1),
        randomize_(UniRepLKNetBlock(16, 13), 1),
        nn.Sequential(randomize_(UniRepLKNetBlock(16, 3), 2), randomize_(DilatedReparamBlock(16, 9), 3)),
    ).eval()
    x = torch.randn(1, 3, 19, 21)
    with torch.no_grad():
        ref = net(x)
        up.reparameterize(net)
        out = net(x)
    assert max_rel_err(out, ref) <= 1e-4
    assert not any(isinstance(m, nn.BatchNorm2d) for m in net.modules())
    # a single block passed on its own is re-parameterised too
    blk = randomize_(UniRepLKNetBlock(8, 7), 4)
    up.reparameterize(blk)
    assert blk.is_reparameterized


def test_reparam_runs_on_meta_device():
    with torch.device("meta"):
        m = UniRepLKNet(depths=(1, 1, 1, 1), dims=(8, 16, 24, 32), kernel_sizes=((3,), (13,), (5,), (0,)))
    m.reparameterize()
    assert all(t.device.type == "meta" for t in m.state_dict().values())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_reparam_on_cuda():
    m = randomize_(UniRepLKNet(depths=(1, 1, 1, 1), dims=(8, 16, 24, 32),
                               kernel_sizes=((3,), (13,), (17,), (0,)), num_classes=5), 5).double().cuda().eval()
    x = torch.randn(2, 3, 45, 37, dtype=torch.float64, device="cuda")
    with torch.no_grad():
        ref = m(x)
        m.reparameterize()
        out = m(x)
    assert max_rel_err(out, ref) <= 1e-10
