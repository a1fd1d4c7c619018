"""The large-kernel depthwise convolution engine: every implementation is exact, the dispatch is controllable."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from _utils import max_rel_err, randomize_
from hypothesis import given
from hypothesis import strategies as st

from uniperception import ops
from uniperception.backbones import UniRepLKNet
from uniperception.errors import InvalidInputError
from uniperception.ops import DepthwiseConv2d, crop_kernel_to_reach, depthwise_conv2d
from uniperception.ops import depthwise as dw

GRAD_IMPLS = ["native", "channels_last", "direct", "fft"]

# (kh, kw, dilation, H, W, batch)
CASES = [
    (3, 3, 1, 17, 23, 2),
    (7, 7, 1, 28, 28, 1),
    (13, 13, 1, 29, 31, 3),
    (13, 13, 1, 7, 7, 2),
    (31, 31, 1, 14, 15, 2),
    (51, 51, 1, 9, 11, 1),
    (51, 5, 1, 33, 20, 2),
    (5, 51, 1, 12, 40, 1),
    (61, 61, 1, 30, 30, 1),
    (3, 3, 4, 21, 19, 2),
    (5, 5, 3, 16, 16, 2),
    (9, 7, 2, 25, 18, 1),
]


def _ref_and_out(impl, kh, kw, d, h, w, b, dtype, padding="same"):
    c = 5
    x = torch.randn(b, c, h, w, dtype=dtype, requires_grad=True)
    wt = torch.randn(c, 1, kh, kw, dtype=dtype, requires_grad=True)
    bias = torch.randn(c, dtype=dtype, requires_grad=True)
    pad = (d * (kh - 1) // 2, d * (kw - 1) // 2) if padding == "same" else padding
    ref = F.conv2d(x, wt, bias, 1, pad, d, c)
    out = depthwise_conv2d(x, wt, bias, padding=padding, dilation=d, impl=impl)
    g = torch.randn_like(ref)
    grads_ref = torch.autograd.grad(ref, (x, wt, bias), g)
    grads_out = torch.autograd.grad(out, (x, wt, bias), g)
    return (ref, *grads_ref), (out, *grads_out)


@pytest.mark.parametrize("impl", GRAD_IMPLS)
@pytest.mark.parametrize("case", CASES, ids=lambda c: "k{}x{}d{}_{}x{}b{}".format(*c))
def test_impl_matches_native_forward_and_gradients_float32(impl, case):
    refs, outs = _ref_and_out(impl, *case, torch.float32)
    for name, r, o in zip(("out", "dx", "dw", "db"), refs, outs, strict=True):
        assert o.shape == r.shape and o.dtype == r.dtype
        assert max_rel_err(o, r) <= 1e-4, name


@pytest.mark.parametrize("impl", GRAD_IMPLS)
def test_impl_float64_exact(impl):
    for case in CASES[:6]:
        refs, outs = _ref_and_out(impl, *case, torch.float64)
        assert all(max_rel_err(o, r) <= 1e-10 for r, o in zip(refs, outs, strict=True))


@pytest.mark.parametrize("impl", ["channels_last", "direct", "fft", "auto"])
@pytest.mark.parametrize("k", [13, 31])
def test_bfloat16(impl, k):
    x = torch.randn(2, 8, 20, 18)
    w = torch.randn(8, 1, k, k) / k
    ref = F.conv2d(x.bfloat16().float(), w.bfloat16().float(), None, 1, k // 2, 1, 8)
    out = depthwise_conv2d(x.bfloat16(), w.bfloat16(), padding=k // 2, impl=impl)
    assert out.dtype == torch.bfloat16
    assert max_rel_err(out.float(), ref) <= 2e-2


def test_blocked_inference_only():
    x, w = torch.randn(2, 16, 20, 20), torch.randn(16, 1, 13, 13)
    with torch.no_grad():
        torch.testing.assert_close(depthwise_conv2d(x, w, padding=6, impl="blocked"), F.conv2d(x, w, None, 1, 6, 1, 16))
    with pytest.raises(InvalidInputError, match="inference-only"):
        depthwise_conv2d(x, w.requires_grad_(), padding=6, impl="blocked")


@given(
    k=st.integers(1, 41), d=st.integers(1, 3), h=st.integers(1, 24), pad=st.integers(0, 30),
)
def test_crop_kernel_to_reach_is_exact(k, d, h, pad):
    if h + 2 * pad < d * (k - 1) + 1:
        return
    x = torch.randn(1, 2, h, h + 3, dtype=torch.float64)
    w = torch.randn(2, 1, k, k, dtype=torch.float64)
    wc, pc = crop_kernel_to_reach(w, (h, h + 3), (pad, pad), (d, d))
    assert wc.shape[-1] <= k and min(pc) >= 0
    torch.testing.assert_close(F.conv2d(x, wc, None, 1, pc, d, 2), F.conv2d(x, w, None, 1, pad, d, 2))


def test_crop_makes_huge_kernels_on_small_maps_small():
    w = torch.randn(4, 1, 51, 51)
    wc, pc = crop_kernel_to_reach(w, (7, 7), (25, 25), (1, 1))
    assert tuple(wc.shape[-2:]) == (13, 13) and pc == (6, 6)


def test_padding_forms_and_errors():
    x, w = torch.randn(1, 3, 10, 12), torch.randn(3, 1, 5, 3)
    same = depthwise_conv2d(x, w, padding="same")
    torch.testing.assert_close(same, F.conv2d(x, w, None, 1, (2, 1), 1, 3))
    torch.testing.assert_close(depthwise_conv2d(x, w, padding=1), F.conv2d(x, w, None, 1, 1, 1, 3))
    torch.testing.assert_close(depthwise_conv2d(x, w, stride=2, padding=2), F.conv2d(x, w, None, 2, 2, 1, 3))
    with pytest.raises(InvalidInputError):
        depthwise_conv2d(x[0], w)
    with pytest.raises(InvalidInputError, match="depthwise weight"):
        depthwise_conv2d(x, torch.randn(4, 1, 3, 3))
    with pytest.raises(InvalidInputError, match="unknown"):
        depthwise_conv2d(x, w, impl="magic")
    with pytest.raises(InvalidInputError, match="odd"):
        depthwise_conv2d(x, torch.randn(3, 1, 4, 4), padding="same")


def test_fft_chunks_large_batches(monkeypatch):
    monkeypatch.setattr("uniperception.ops.fft._CHUNK_ELEMENTS", 2000)
    x, w = torch.randn(7, 3, 15, 15, requires_grad=True), torch.randn(3, 1, 9, 9)
    out = depthwise_conv2d(x, w, padding=4, impl="fft")
    ref = F.conv2d(x, w, None, 1, 4, 1, 3)
    assert max_rel_err(out, ref) <= 1e-4
    (gx,) = torch.autograd.grad(out.sum(), x)
    (gr,) = torch.autograd.grad(ref.sum(), x)
    assert max_rel_err(gx, gr) <= 1e-4


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("bias", [False, True])
def test_fft_inference_path_chunks_layout_and_bias(monkeypatch, channels_last, bias):
    # inference writes each chunk's window straight into the output, in the input's layout
    monkeypatch.setattr("uniperception.ops.fft._CHUNK_ELEMENTS", 3000)
    x = torch.randn(5, 4, 13, 17)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    w, b = torch.randn(4, 1, 11, 9), (torch.randn(4) if bias else None)
    with torch.inference_mode():
        out = depthwise_conv2d(x, w, b, padding=(5, 4), impl="fft")
    assert max_rel_err(out, F.conv2d(x, w, b, 1, (5, 4), 1, 4)) <= 1e-4
    assert out.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


@pytest.mark.parametrize("impl", ["native", "channels_last", "direct", "fft", "auto"])
def test_weight_grad_has_the_parameters_strides(impl):
    # DDP compares gradient strides with its bucket views literally: PyTorch's channels-last depthwise
    # backward gives [9, 1, 3, 1] for a [C, 1, 3, 3] weight of strides [9, 9, 3, 1] (same memory)
    conv = DepthwiseConv2d(8, 3, impl=impl)
    x = torch.randn(2, 8, 10, 10).contiguous(memory_format=torch.channels_last).requires_grad_()
    ref_x = x.detach().clone().requires_grad_()
    conv(x).sum().backward()
    assert conv.weight.grad.stride() == conv.weight.stride()
    w = conv.weight.detach().clone().requires_grad_()
    F.conv2d(ref_x, w, None, 1, 1, 1, 8).sum().backward()
    assert max_rel_err(conv.weight.grad, w.grad) <= 1e-5 and max_rel_err(x.grad, ref_x.grad) <= 1e-5


def test_fft_rejects_bad_arguments():
    with pytest.raises(ValueError, match="C×1×kh×kw"):
        ops.fft_depthwise_conv2d(torch.randn(3, 8, 8), torch.randn(3, 1, 3, 3))
    with pytest.raises(ValueError, match="C×1×kh×kw"):
        ops.fft_depthwise_conv2d(torch.randn(1, 3, 8, 8), torch.randn(4, 1, 3, 3))
    with pytest.raises(ValueError, match="memory_format"):
        ops.fft_depthwise_conv2d(torch.randn(1, 3, 8, 8), torch.randn(3, 1, 3, 3), memory_format=torch.preserve_format)


@pytest.fixture
def fft_cache():
    from uniperception.ops import fft

    fft.set_fft_kernel_cache(True)
    fft.clear_fft_kernel_cache()
    yield fft
    fft.clear_fft_kernel_cache()


def _fft_eval(conv, x):
    with torch.inference_mode():
        return conv(x)


def test_fft_kernel_spectrum_kept_and_invalidated(fft_cache):
    conv = DepthwiseConv2d(6, 31, padding=15, bias=True, impl="fft").eval()
    x = torch.randn(2, 6, 20, 23)
    def ref(c: DepthwiseConv2d = conv) -> torch.Tensor:
        return F.conv2d(x, c.weight.detach(), c.bias.detach(), 1, 15, 1, 6)
    assert max_rel_err(_fft_eval(conv, x), ref()) <= 1e-4
    assert len(fft_cache._KERNEL_CACHE) == 1
    (entries,) = [slot[1] for slot in fft_cache._KERNEL_CACHE.values()]
    (spec,) = [e[1] for e in entries.values()]
    _fft_eval(conv, x)
    assert next(e[1] for e in entries.values()) is spec  # same parameter, same grid: reused
    # every way of changing the weights invalidates it: in place (version counter), through .data (no
    # version bump: the fingerprint), a new tensor behind the parameter, load_state_dict
    with torch.no_grad():
        conv.weight.mul_(-2.0)
    assert max_rel_err(_fft_eval(conv, x), ref()) <= 1e-4
    conv.weight.data[0, 0, 15, 15] += 1.0
    assert max_rel_err(_fft_eval(conv, x), ref()) <= 1e-4
    conv.weight.data = torch.randn_like(conv.weight)
    assert max_rel_err(_fft_eval(conv, x), ref()) <= 1e-4
    conv.load_state_dict({"weight": torch.randn(6, 1, 31, 31), "bias": torch.randn(6)})
    assert max_rel_err(_fft_eval(conv, x), ref()) <= 1e-4
    # another input size is another grid: a second entry for the same parameter
    x2 = torch.randn(1, 6, 40, 41)
    assert max_rel_err(_fft_eval(conv, x2), F.conv2d(x2, conv.weight.detach(), conv.bias.detach(), 1, 15, 1, 6)) <= 1e-4
    assert len(entries) == 2
    # entries die with their parameter
    ref = None  # its default argument holds the module too
    del conv, entries, spec
    import gc

    gc.collect()
    assert len(fft_cache._KERNEL_CACHE) == 0


def test_fft_kernel_cache_threads(fft_cache, monkeypatch):
    """Threads sharing one layer, each cycling through more grids than are kept: every result exact, no
    errors (unguarded, two threads evicting the same oldest entry raised KeyError within a few thousand
    calls), never more than the cap per parameter."""
    import sys
    import threading

    monkeypatch.setattr(fft_cache, "_KERNEL_CACHE_PER_PARAM", 1)
    conv = DepthwiseConv2d(1, 3, padding=1, bias=True, impl="fft").eval()
    inputs = [torch.randn(1, 1, 4 + i, 4) for i in range(8)]
    refs = [F.conv2d(x, conv.weight.detach(), conv.bias.detach(), 1, 1, 1, 1) for x in inputs]
    errors: list[BaseException] = []
    worst = [0.0]
    torch_threads, interval = torch.get_num_threads(), sys.getswitchinterval()
    torch.set_num_threads(1)
    sys.setswitchinterval(1e-6)  # switch threads between almost any two bytecodes: races show up

    def work(seed: int) -> None:
        try:
            for i in range(1500):
                j = (seed + i) % len(inputs)
                worst[0] = max(worst[0], max_rel_err(_fft_eval(conv, inputs[j]), refs[j]))
        except BaseException as e:  # collected, re-raised by the assert below
            errors.append(e)

    try:
        threads = [threading.Thread(target=work, args=(s,)) for s in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=300)
    finally:
        torch.set_num_threads(torch_threads)
        sys.setswitchinterval(interval)
    assert not errors, repr(errors[0])
    assert worst[0] <= 1e-4
    (slot,) = fft_cache._KERNEL_CACHE.values()
    assert len(slot[1]) <= 1


def test_fft_kernel_cache_not_used_in_training_or_when_off(fft_cache):
    conv = DepthwiseConv2d(3, 21, padding=10, impl="fft")
    x = torch.randn(1, 3, 16, 16, requires_grad=True)
    conv(x).sum().backward()  # training: the spectrum is part of the graph, never kept
    assert conv.weight.grad is not None and len(fft_cache._KERNEL_CACHE) == 0
    fft_cache.set_fft_kernel_cache(False)
    try:
        _fft_eval(conv.eval(), x.detach())
        assert len(fft_cache._KERNEL_CACHE) == 0
    finally:
        fft_cache.set_fft_kernel_cache(True)
    # a frozen kernel: kept in inference, but a graph that needs the input's gradient gets a fresh spectrum
    # (a kept one made under inference_mode could not be saved for backward)
    frozen = DepthwiseConv2d(3, 21, padding=10, impl="fft").eval().requires_grad_(False)
    _fft_eval(frozen, x.detach())
    assert len(fft_cache._KERNEL_CACHE) == 1
    xg = x.detach().clone().requires_grad_()
    frozen(xg).sum().backward()
    ref = x.detach().clone().requires_grad_()
    F.conv2d(ref, frozen.weight, None, 1, 10, 1, 3).sum().backward()
    assert max_rel_err(xg.grad, ref.grad) <= 1e-4
    fft_cache.clear_fft_kernel_cache()
    # plain tensors (not parameters) are never kept: their storage may be reused by another kernel
    with torch.inference_mode():
        depthwise_conv2d(x.detach(), torch.randn(3, 1, 21, 21), padding=10, impl="fft")
    assert len(fft_cache._KERNEL_CACHE) == 0


@pytest.fixture
def profile(request):
    """Pin the cost model's CPU profile (the dispatch's choices are per instruction set)."""
    ops.set_cpu_profile(request.param)
    yield ops.cpu_profile()
    ops.set_cpu_profile(None)


@pytest.mark.parametrize("profile", ["avx512"], indirect=True)
def test_auto_choices_avx512(profile):
    x = torch.randn(32, 64, 56, 56)
    w13, w3 = torch.randn(64, 1, 13, 13), torch.randn(64, 1, 3, 3)
    assert ops.choose_impl(x, w3, (1, 1), (1, 1), training=False) == "channels_last"
    assert ops.choose_impl(x, w13, (6, 6), (1, 1), training=True) == "fft"
    w51 = torch.randn(320, 1, 13, 13)  # a 51×51 kernel on 7×7 maps after cropping
    small = torch.randn(32, 320, 7, 7)
    # inference: PyTorch's NCHW kernel on NCHW input, oneDNN's NHWC one (15×15-padded) on channels-last input
    assert ops.choose_impl(small, w51, (6, 6), (1, 1), training=False) == "native"
    cl = small.contiguous(memory_format=torch.channels_last)
    assert ops.choose_impl(cl, w51, (6, 6), (1, 1), training=False) == "channels_last"
    assert ops.choose_impl(x, torch.randn(64, 1, 31, 31), (15, 15), (1, 1), training=False) != "native"
    # the hand-written backward is never picked by this profile's cost model (not measured there)
    assert ops.choose_impl(cl, w51, (6, 6), (1, 1), training=True) == "fft"


@pytest.mark.parametrize("profile", ["avx2"], indirect=True)
def test_auto_choices_avx2(profile):
    """AVX2: NCHW's 13×13 kernel is a slow fallback (never chosen), no 15×15 padding, direct backward on
    small maps, FFT for training at 56², for 13×13 inference at 56² (batch 32, not batch 1 at 28²) and for
    31×31 inference at 56²/28²."""
    for c, s in ((40, 56), (80, 28), (160, 14), (320, 7)):
        x = torch.randn(32, c, s, s)
        w13 = torch.randn(c, 1, 13, 13)
        want = "fft" if s == 56 else "channels_last"
        assert ops.choose_impl(x, w13, (6, 6), (1, 1), training=False) == want
    assert ops.choose_impl(torch.randn(1, 80, 28, 28), torch.randn(80, 1, 13, 13), (6, 6), (1, 1), False) \
        == "channels_last"
    assert ops.choose_impl(torch.randn(32, 40, 56, 56), torch.randn(40, 1, 13, 13), (6, 6), (1, 1), True) == "fft"
    for c, s in ((160, 14), (320, 7)):
        x = torch.randn(32, c, s, s).contiguous(memory_format=torch.channels_last)
        assert ops.choose_impl(x, torch.randn(c, 1, 13, 13), (6, 6), (1, 1), training=True) == "direct"
    assert ops.choose_impl(torch.randn(32, 80, 28, 28), torch.randn(80, 1, 31, 31), (15, 15), (1, 1), False) == "fft"
    assert ops.choose_impl(torch.randn(32, 160, 14, 14), torch.randn(160, 1, 27, 27), (13, 13), (1, 1), False) \
        == "channels_last"
    # NCHW's kernel is the fast one for kernels up to 9 wide, tall ones included
    x = torch.randn(32, 80, 28, 28)
    for (kh, kw), want in (((3, 3), "native"), ((51, 5), "native"), ((9, 9), "native"), ((5, 51), "channels_last"),
                           ((11, 11), "channels_last")):
        assert ops.choose_impl(x, torch.randn(80, 1, kh, kw), (kh // 2, kw // 2), (1, 1), False) == want
    cl = x.contiguous(memory_format=torch.channels_last)
    assert ops.choose_impl(cl, torch.randn(80, 1, 51, 5), (25, 2), (1, 1), False) == "channels_last"


def test_cpu_profile_selection(monkeypatch):
    assert ops.cpu_profile().name in dw.PROFILES
    monkeypatch.setenv("UNIPERCEPTION_CPU_PROFILE", "avx512")
    assert ops.cpu_profile().name == "avx512"
    monkeypatch.setenv("UNIPERCEPTION_CPU_PROFILE", "avx2")
    assert ops.cpu_profile().name == "avx2"
    ops.set_cpu_profile("avx512")  # the explicit setting wins over the environment
    try:
        assert ops.cpu_profile().name == "avx512"
    finally:
        ops.set_cpu_profile(None)
    monkeypatch.setenv("UNIPERCEPTION_CPU_PROFILE", "pentium")
    with pytest.raises(InvalidInputError, match="unknown CPU profile"):
        ops.cpu_profile()
    with pytest.raises(InvalidInputError, match="unknown CPU profile"):
        ops.set_cpu_profile("pentium")


@pytest.mark.parametrize("profile", ["avx512", "avx2"], indirect=True)
def test_pad13_follows_the_profile(profile, monkeypatch):
    """The 15×15 padding of 13×13 inference kernels is an AVX-512 rule; outputs are equal either way."""
    seen = []
    real = F.conv2d
    monkeypatch.setattr(dw.F, "conv2d", lambda x, w, *a: seen.append(tuple(w.shape[-2:])) or real(x, w, *a))
    x, w = torch.randn(2, 8, 14, 14), torch.randn(8, 1, 13, 13)
    with torch.no_grad():
        out = depthwise_conv2d(x, w, padding=6, impl="channels_last")
    assert seen == [(15, 15) if profile.pad13_max_width else (13, 13)]
    assert max_rel_err(out, real(x, w, None, 1, 6, 1, 8)) <= 1e-5


def test_direct_backward_edge_cases():
    """Padding beyond the kernel's reach (negative complementary padding), rectangular and dilated kernels,
    only some inputs needing gradients, a channels-last input, an expanded output gradient."""
    for (kh, kw), pad, d in (((3, 3), (4, 5), (1, 1)), ((5, 3), (1, 0), (2, 3)), ((1, 7), (0, 3), (1, 1))):
        x = torch.randn(3, 4, 9, 11, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
        w = torch.randn(4, 1, kh, kw, dtype=torch.float64)
        for need_x, need_w in ((True, True), (True, False), (False, True)):
            xr, wr = x.clone().requires_grad_(need_x), w.clone().requires_grad_(need_w)
            out = depthwise_conv2d(xr, wr, padding=pad, dilation=d, impl="direct")
            ref = F.conv2d(xr, wr, None, 1, pad, d, 4)
            assert max_rel_err(out, ref) <= 1e-10
            inputs = [t for t in (xr, wr) if t.requires_grad]
            got = torch.autograd.grad(out.sum(), inputs)  # sum(): an expanded, stride-0 gradient
            want = torch.autograd.grad(ref.sum(), inputs)
            assert all(max_rel_err(a, b) <= 1e-10 for a, b in zip(got, want, strict=True))


def test_direct_under_bf16_autocast():
    """Under autocast the conv runs in bfloat16 and the gradients come back in the parameters' float32."""
    x = torch.randn(2, 8, 12, 10, requires_grad=True)
    w = torch.randn(8, 1, 13, 13, requires_grad=True)
    b = torch.randn(8, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = depthwise_conv2d(x, w, b, padding=6, impl="direct")
        ref = F.conv2d(x, w, b, 1, 6, 1, 8)
    assert out.dtype == ref.dtype == torch.bfloat16
    got = torch.autograd.grad(out.float().square().sum(), (x, w, b))
    want = torch.autograd.grad(ref.float().square().sum(), (x, w, b))
    for g, r, t in zip(got, want, (x, w, b), strict=True):
        assert g.dtype == t.dtype and max_rel_err(g, r) <= 3e-2


def test_direct_bfloat16_gradients():
    x = torch.randn(2, 8, 12, 10).bfloat16().requires_grad_()
    w = (torch.randn(8, 1, 13, 13) / 13).bfloat16().requires_grad_()
    out = depthwise_conv2d(x, w, padding=6, impl="direct")
    g = torch.randn_like(out)
    gx, gw = torch.autograd.grad(out, (x, w), g)
    xf, wf = x.detach().float().requires_grad_(), w.detach().float().requires_grad_()
    rx, rw = torch.autograd.grad(F.conv2d(xf, wf, None, 1, 6, 1, 8), (xf, wf), g.float())
    assert gx.dtype == gw.dtype == torch.bfloat16
    assert max_rel_err(gx.float(), rx) <= 2e-2 and max_rel_err(gw.float(), rw) <= 2e-2


def test_fft_keeps_the_channels_last_layout():
    """A channels-last model must get a channels-last tensor back from the FFT path (and the same values)."""
    x = torch.randn(2, 8, 12, 12).contiguous(memory_format=torch.channels_last)
    w = torch.randn(8, 1, 13, 13)
    y = depthwise_conv2d(x, w, padding=6, impl="fft")
    assert y.is_contiguous(memory_format=torch.channels_last)
    assert max_rel_err(y, F.conv2d(x, w, None, 1, 6, 1, 8)) <= 1e-4
    assert not depthwise_conv2d(x.contiguous(), w, padding=6, impl="fft").is_contiguous(memory_format=torch.channels_last)
    # ...and its input gradient on channels-last too (autograd adds it to the other branches' gradients)
    xg = x.clone().requires_grad_()
    gy = torch.randn(2, 8, 12, 12)
    (gx,) = torch.autograd.grad(depthwise_conv2d(xg, w, padding=6, impl="fft"), xg, gy)
    (ref,) = torch.autograd.grad(F.conv2d(xg, w, None, 1, 6, 1, 8), xg, gy)
    assert gx.is_contiguous(memory_format=torch.channels_last) and max_rel_err(gx, ref) <= 1e-4


def test_forcing_implementations(monkeypatch):
    x, w = torch.randn(2, 4, 16, 16), torch.randn(4, 1, 31, 31)
    calls = []
    monkeypatch.setitem(dw._IMPL_FNS, "fft", lambda *a: calls.append("fft") or F.conv2d(a[0], a[1], a[2], 1, a[3], a[4], 4))
    with ops.force_impl("fft"):
        depthwise_conv2d(x, w, padding=15)
    monkeypatch.setenv("UNIPERCEPTION_CONV_IMPL", "fft")
    depthwise_conv2d(x, w, padding=15)
    assert calls == ["fft", "fft"]
    with pytest.raises(InvalidInputError):
        with ops.force_impl("nope"):
            pass


def test_autotune_caches_a_choice():
    ops.set_autotune(True)
    try:
        x, w = torch.randn(2, 4, 16, 16), torch.randn(4, 1, 9, 9)
        depthwise_conv2d(x, w, padding=4)
        assert len(dw._AUTOTUNE_CACHE) == 1 and next(iter(dw._AUTOTUNE_CACHE.values())) in dw.IMPLS
    finally:
        ops.set_autotune(False)
    assert not dw._AUTOTUNE_CACHE


def test_module_keys_lock_and_state():
    m = DepthwiseConv2d(6, 13, bias=True)
    plain = torch.nn.Conv2d(6, 6, 13, padding=6, groups=6)
    assert m.state_dict().keys() == plain.state_dict().keys()
    x = torch.randn(2, 6, 20, 20)
    m(x).sum().backward()
    assert m.locked_impl in dw.IMPLS
    net = torch.nn.Sequential(m, DepthwiseConv2d(6, 3))
    state = ops.conv_impl_state(net)
    assert state == {"0": m.locked_impl}
    fresh = torch.nn.Sequential(DepthwiseConv2d(6, 13, bias=True), DepthwiseConv2d(6, 3))
    ops.load_conv_impl_state(fresh, state)
    assert fresh[0].locked_impl == m.locked_impl
    ops.set_conv_impl(fresh, "native")
    assert fresh[0].impl == "native" and fresh[0].locked_impl is None


@pytest.mark.parametrize("impl", ["native", "channels_last", "direct", "fft"])
def test_model_outputs_identical_across_impls(impl):
    m = randomize_(UniRepLKNet(depths=(1, 1, 1, 1), dims=(8, 16, 24, 32),
                               kernel_sizes=((3,), (13,), (17,), (11,)), num_classes=5), 3).eval()
    x = torch.randn(2, 3, 61, 45)
    with torch.no_grad():
        ref = m.set_conv_impl("native")(x)
        out = m.set_conv_impl(impl)(x)
        m.reparameterize()
        dep = m(x)
    assert max_rel_err(out, ref) <= 1e-4 and max_rel_err(dep, ref) <= 1e-4


def test_fused_linear_gelu_matches_eager():
    from uniperception.ops.fused import linear_gelu_nchw, onednn_fusion_available

    x = torch.randn(3, 8, 11, 13).contiguous(memory_format=torch.channels_last)
    w, b = torch.randn(32, 8), torch.randn(32)
    ref = F.gelu(F.conv2d(x, w[:, :, None, None], b))
    with torch.no_grad():
        out = linear_gelu_nchw(x, w, b)
    assert max_rel_err(out, ref) <= 1e-5
    # with autograd the eager path runs and gradients flow
    wg = w.clone().requires_grad_()
    linear_gelu_nchw(x, wg, b).sum().backward()
    assert wg.grad is not None
    assert isinstance(onednn_fusion_available(), bool)


@pytest.mark.parametrize("layout", [torch.channels_last, torch.contiguous_format])
def test_conv1x1_training_matches_conv2d(layout):
    """The 1×1 conv with a summed bias gradient gives F.conv2d's output and every gradient (odd sizes)."""
    from uniperception.ops.fused import conv1x1

    torch.manual_seed(0)
    x0 = torch.randn(3, 8, 11, 13).contiguous(memory_format=layout)
    w0, b0 = torch.randn(24, 8, 1, 1), torch.randn(24)
    gy = torch.randn(3, 24, 11, 13)
    grads = []
    for fn in (F.conv2d, conv1x1):
        x, w, b = (t.clone().requires_grad_() for t in (x0, w0, b0))
        y = fn(x, w, b)
        if fn is conv1x1:
            assert type(y.grad_fn).__name__ == "_Conv1x1Backward"  # the custom backward ran
        y.backward(gy)
        grads.append((y.detach(), x.grad, w.grad, b.grad))
    for got, ref in zip(grads[1], grads[0], strict=True):
        assert max_rel_err(got, ref) <= 1e-5
    # only the weight needs a gradient: the input's is not computed
    x, w, b = x0.clone(), w0.clone().requires_grad_(), b0.clone().requires_grad_()
    conv1x1(x, w, b).sum().backward()
    assert w.grad is not None and b.grad is not None and x.grad is None


def test_conv1x1_double_backward_and_fallbacks():
    from uniperception.ops.fused import _Conv1x1, conv1x1

    x = torch.randn(2, 5, 7, 9, dtype=torch.float64).requires_grad_()
    w = torch.randn(6, 5, 1, 1, dtype=torch.float64, requires_grad=True)
    b = torch.randn(6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(_Conv1x1.apply, (x, w, b))
    assert torch.autograd.gradgradcheck(_Conv1x1.apply, (x, w, b))
    # plain F.conv2d where the custom backward has nothing to save: no bias, no grad, frozen bias, autocast
    assert type(conv1x1(x, w, None).grad_fn).__name__ == "ConvolutionBackward0"
    assert type(conv1x1(x, w, b.detach()).grad_fn).__name__ == "ConvolutionBackward0"
    with torch.no_grad():
        assert conv1x1(x, w, b).grad_fn is None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = conv1x1(x.float(), w.float(), b.float())
    assert y.dtype == torch.bfloat16 and type(y.grad_fn).__name__ != "_Conv1x1Backward"


def test_block_training_uses_summed_bias_gradient():
    """UniRepLKNet's pwconv1 goes through conv1x1 in training (the lever the training-step benchmark measures)."""
    from uniperception.layers.unireplknet_block import UniRepLKNetBlock

    blk = UniRepLKNetBlock(16, 7).train()
    x = torch.randn(2, 16, 9, 11).contiguous(memory_format=torch.channels_last)
    names: set[str] = set()
    y = blk(x)
    stack = [y.grad_fn]
    while stack:
        fn = stack.pop()
        if fn is None or type(fn).__name__ in names:
            continue
        names.add(type(fn).__name__)
        stack.extend(f for f, _ in fn.next_functions)
    assert "_Conv1x1Backward" in names


def test_deploy_model_matches_training_form_on_odd_sizes():
    """Mixed kernel sizes, sizes not multiples of 32: the deploy form's logits are the training form's."""
    m = UniRepLKNet(depths=(1, 1, 2, 1), dims=(16, 32, 48, 64), kernel_sizes=((3,), (13,), (13, 11), (7,)),
                    num_classes=5).eval()
    randomize_(m, seed=0)
    x = torch.randn(2, 3, 75, 61)
    with torch.no_grad():
        ref = m(x)
        m.reparameterize()
        dep = m(x)
    assert max_rel_err(dep, ref) <= 1e-4


@pytest.mark.parametrize("profile", ["avx512", "avx2"], indirect=True)
def test_dilated_small_kernels_stay_direct_in_training(profile):
    """A 3×3 kernel with dilation 5 has 9 taps: the FFT of its 11×11 extent must not be chosen."""
    x = torch.randn(32, 80, 28, 28)
    for k, r in ((3, 3), (3, 4), (3, 5), (5, 1), (7, 2)):
        pad = r * (k - 1) // 2
        assert ops.choose_impl(x, torch.randn(80, 1, k, k), (pad, pad), (r, r), training=True) != "fft"


@pytest.mark.parametrize("profile", ["avx2"], indirect=True)
@pytest.mark.parametrize("impl", ["auto", "channels_last", "direct", "fft"])
def test_wide_dilated_kernels_are_rewritten_on_avx2(profile, impl, monkeypatch):
    """On AVX2 a dilated kernel wider than 9 taps runs undilated on the map's sub-grids (space-to-batch) when
    they are at least 3 pixels wide on a map at least 14 wide, else as its dense equivalent; narrower ones keep their dilation;
    ``native`` is never rewritten. Outputs and gradients are the plain dilated conv's."""
    seen = []
    real = F.conv2d
    monkeypatch.setattr(dw.F, "conv2d", lambda x, w, b, s, p, d, g: seen.append(
        (tuple(x.shape), tuple(w.shape[-2:]), dw._pair(d))) or real(x, w, b, s, p, d, g))
    # (map, k, dilation, expected first conv: input shape, kernel, dilation)
    for (h, wd), k, d, first in (
        ((15, 14), 7, 2, ((8, 6, 8, 7), (7, 7), (1, 1))),  # 2×2 sub-grids of 8×7 (zero-padded to 16×14)
        ((15, 14), 3, 5, ((50, 6, 3, 3), (3, 3), (1, 1))),  # 5×5 sub-grids of 3×3
        ((9, 14), 3, 5, ((2, 6, 9, 14), (11, 11), (1, 1))),  # sub-grids 2 high: too small, dense 11×11
        ((15, 13), 7, 2, ((2, 6, 15, 13), (13, 13), (1, 1))),  # a map under 14 wide: dense 13×13
        ((15, 14), 3, 4, ((2, 6, 15, 14), (3, 3), (4, 4))),  # extent 9: oneDNN's dilated kernel is fine
    ):
        x = torch.randn(2, 6, h, wd, dtype=torch.float64, requires_grad=True)
        w = torch.randn(6, 1, k, k, dtype=torch.float64, requires_grad=True)
        pad = d * (k - 1) // 2
        seen.clear()
        out = depthwise_conv2d(x, w, padding=pad, dilation=d, impl=impl)
        ref = real(x, w, None, 1, pad, d, 6)
        assert max_rel_err(out, ref) <= 1e-10
        g = torch.randn_like(ref)
        got, want = torch.autograd.grad(out, (x, w), g), torch.autograd.grad(ref, (x, w), g)
        assert all(max_rel_err(a, b) <= 1e-10 for a, b in zip(got, want, strict=True))
        if impl != "fft":  # the first conv is the forward
            assert seen and seen[0] == first, seen
    seen.clear()
    depthwise_conv2d(x, torch.randn(6, 1, 7, 7, dtype=torch.float64), padding=6, dilation=2, impl="native")
    assert seen[0][1:] == ((7, 7), (2, 2))


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize(("kh", "kw", "dil", "pad", "h", "w"), [
    (7, 7, (2, 2), (6, 6), 28, 28),
    (3, 3, (5, 5), (5, 5), 14, 14),    # 14 = 2·5 + 4: sub-grids of 3 and 2 pixels, zero-padded to 15
    (3, 5, (3, 2), (3, 4), 17, 10),    # rectangular kernel, different dilations
    (5, 3, (1, 4), (2, 4), 9, 23),     # dilated along one axis only
    (3, 3, (2, 2), (4, 6), 11, 12),    # padding beyond "same" (multiples of the dilation): larger output
    (5, 5, (3, 3), (3, 3), 16, 20),    # padding below "same": smaller output
])
def test_space_to_batch_conv_is_exact(kh, kw, dil, pad, h, w, channels_last):
    """The sub-grid formulation equals the dilated conv (forward and every gradient, float64), keeps the
    memory format, with bias, for any padding that is a multiple of the dilation."""
    c = 4
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(3, c, h, w, dtype=torch.float64).contiguous(memory_format=fmt).requires_grad_()
    wt = torch.randn(c, 1, kh, kw, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(c, dtype=torch.float64, requires_grad=True)
    ref = F.conv2d(x, wt, bias, 1, pad, dil, c)
    g = torch.randn_like(ref)
    want = torch.autograd.grad(ref, (x, wt, bias), g)
    for impl in ("native", "direct"):  # the sub-grid conv's own implementation
        out = dw._space_to_batch_conv(x, wt, bias, pad, dil, impl)
        assert out.shape == ref.shape and max_rel_err(out, ref) <= 1e-10
        assert out.is_contiguous(memory_format=fmt)
        got = torch.autograd.grad(out, (x, wt, bias), g)
        assert all(max_rel_err(a, b) <= 1e-10 for a, b in zip(got, want, strict=True))


@pytest.mark.parametrize("profile", ["avx2", "avx512"], indirect=True)
def test_space_to_batch_dispatch_and_locking(profile):
    """Where the profile runs a dilated layer on sub-grids, ``resolve_impl`` names the sub-grid conv's
    implementation and a training layer locks it; float32 results match ``native``. AVX-512 never rewrites."""
    conv = DepthwiseConv2d(16, 7, dilation=2).train()
    x = torch.randn(4, 16, 28, 28).contiguous(memory_format=torch.channels_last).requires_grad_()
    applies = dw._space_to_batch_applies(x, conv.weight, conv.padding, conv.dilation)
    assert applies == (profile.name == "avx2")
    out = conv(x)
    assert conv.locked_impl == dw.resolve_impl(x, conv.weight, conv.bias, conv.padding, conv.dilation)
    ref = F.conv2d(x, conv.weight, None, 1, conv.padding, conv.dilation, 16)
    assert max_rel_err(out, ref) <= 1e-4 and out.is_contiguous(memory_format=torch.channels_last)
    g = torch.randn_like(ref)
    got = torch.autograd.grad(out, (x, conv.weight), g)
    want = torch.autograd.grad(ref, (x, conv.weight), g)
    assert all(max_rel_err(a, b) <= 1e-4 for a, b in zip(got, want, strict=True))
    # small maps and paddings that are not multiples of the dilation keep the other paths
    assert not dw._space_to_batch_applies(torch.randn(1, 16, 4, 28), conv.weight, (6, 6), (2, 2))
    assert not dw._space_to_batch_applies(x, conv.weight, (5, 6), (2, 2))


def test_fft_grid_sizes_avoid_slow_lengths():
    """FFT grids are 5-smooth, in [n, 2n], and avoid factors of 7 and odd lengths where an even one is cheaper
    (measured 1.3-1.8× faster per element with oneMKL); the cost model keeps its fitted 7-smooth rule."""
    from uniperception.ops.fft import fft_size, smooth7_size

    for n in range(1, 130):
        s = fft_size(n)
        assert n <= s <= max(2 * n, 1)
        m = s
        for p in (2, 3, 5):
            while m % p == 0:
                m //= p
        assert m == 1, (n, s)
    assert [fft_size(n) for n in (13, 14, 20, 27, 34, 35, 43, 62, 81)] == [16, 16, 20, 30, 36, 36, 48, 64, 90]
    assert [smooth7_size(n) for n in (13, 34, 62)] == [14, 35, 63]
