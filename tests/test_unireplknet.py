"""UniRepLKNet: official structure (keys, shapes, parameter counts), official numbers, model API."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

import uniperception as up
from uniperception.backbones import UniRepLKNet, default_kernel_sizes
from uniperception.checkpoints import load_official
from uniperception.errors import InvalidInputError
from uniperception.layers import GRN, LayerNorm2d, UniRepLKNetBlock

VARIANTS = ["a", "f", "p", "n", "t", "s", "b", "l", "xl"]
BIG = {"b", "l", "xl"}

# spec §1: parameters only (no BN buffers), num_classes=1000, in_chans=3
PARAMS = {
    "a": (4_649_060, 4_437_300),
    "f": (6_489_328, 6_235_216),
    "p": (11_080_520, 10_741_704),
    "n": (18_818_880, 18_318_560),
    "t": (31_693_420, 31_037_980),
    "s": (56_456_704, 55_645_984),
    "b": (99_089_416, 98_008_456),
    "l": (220_076_056, 218_454_616),
    "xl": (388_690_984, 386_529_064),
}


def _manifest(reference, name: str) -> dict[str, list[int]]:
    return json.loads((reference / "official_keys" / f"{name}.json").read_text())


def _shapes(model: nn.Module) -> dict[str, list[int]]:
    return {k: list(v.shape) for k, v in model.state_dict().items()}


@pytest.mark.parametrize("variant", VARIANTS)
def test_official_keys_shapes_and_param_counts(reference, variant):
    name = f"unireplknet_{variant}"
    with torch.device("meta"):
        train = up.create_model(name)
        deploy = up.create_model(name, deploy=True)
    # exact key order and shapes, both forms
    assert list(_shapes(train).items()) == list(_manifest(reference, name).items())
    assert list(_shapes(deploy).items()) == list(_manifest(reference, name + "_deploy").items())
    n_train = sum(p.numel() for p in train.parameters())
    n_deploy = sum(p.numel() for p in deploy.parameters())
    assert (n_train, n_deploy) == PARAMS[variant]
    # re-parameterising the training form yields exactly the deploy layout (on meta: no compute needed)
    train.reparameterize()
    assert list(_shapes(train).items()) == list(_manifest(reference, name + "_deploy").items())


@pytest.fixture(scope="module")
def official_a(reference):
    vec = reference / "vectors"
    return (
        load_file(str(vec / "unireplknet_a_random.safetensors")),
        load_file(str(vec / "unireplknet_a_random_deploy.safetensors")),
        load_file(str(vec / "unireplknet_a_io.safetensors")),
    )


def test_reference_vectors_training_reparam_and_deploy(official_a):
    train_sd, deploy_sd, io = official_a
    model = up.create_model("unireplknet_a").eval()
    assert load_official(model, train_sd).ok
    with torch.no_grad():
        torch.testing.assert_close(model(io["input"]), io["logits"], atol=1e-5, rtol=0)
        model.reparameterize()
        torch.testing.assert_close(model(io["input"]), io["logits_reparam"], atol=1e-5, rtol=0)
    # our re-parameterisation produces the official deploy state dict
    ours = model.state_dict()
    assert list(ours) == list(deploy_sd) or set(ours) == set(deploy_sd)
    for k, v in deploy_sd.items():
        torch.testing.assert_close(ours[k], v, atol=1e-5, rtol=1e-5, msg=k)
    # a model built in deploy form loads the official deploy dict and reproduces the logits
    built = up.create_model("unireplknet_a", deploy=True).eval()
    built.load_state_dict(deploy_sd, strict=True)
    with torch.no_grad():
        torch.testing.assert_close(built(io["input"]), io["logits_reparam"], atol=1e-5, rtol=0)


def test_float64_reference_reparam_is_exact(official_a):
    train_sd, _, io = official_a
    model = up.create_model("unireplknet_a").eval()
    load_official(model, train_sd)
    model.double()
    x = io["input"].double()
    with torch.no_grad():
        before = model(x)
        model.reparameterize()
        after = model(x)
    assert (before - after).abs().max().item() <= 1e-10
    torch.testing.assert_close(before.float(), io["logits"], atol=1e-5, rtol=0)


def test_numerics_match_official_conventions():
    """The small constants the logits are only weakly sensitive to (spec §13.11), checked directly."""
    m = UniRepLKNet(depths=(1, 1, 1, 1), dims=(8, 16, 32, 64), kernel_sizes=((3,), (3,), (3,), (3,)))
    lns = [x for x in m.modules() if isinstance(x, (nn.LayerNorm, LayerNorm2d))]
    assert lns and all(x.eps == 1e-6 for x in lns)
    bns = [x for x in m.modules() if isinstance(x, nn.BatchNorm2d)]
    assert bns and all(x.eps == 1e-5 for x in bns)
    gelus = [x for x in m.modules() if isinstance(x, nn.GELU)]
    assert gelus and all(x.approximate == "none" for x in gelus)
    grn = next(x for x in m.modules() if isinstance(x, GRN))
    assert grn.gamma.shape == (1, 1, 1, 32) and grn.eps == 1e-6


def test_layernorm2d_equals_explicit_channels_first_formula():
    ln = LayerNorm2d(6)
    with torch.no_grad():
        ln.weight.uniform_(0.5, 1.5)
        ln.bias.normal_()
    x = torch.randn(2, 6, 5, 7) * 3 + 1
    u = x.mean(1, keepdim=True)
    s = (x - u).pow(2).mean(1, keepdim=True)
    ref = (x - u) / torch.sqrt(s + 1e-6) * ln.weight[:, None, None] + ln.bias[:, None, None]
    torch.testing.assert_close(ln(x), ref, atol=1e-5, rtol=1e-5)


def test_default_kernel_tables():
    assert default_kernel_sizes((2, 2, 6, 2)) == ((3, 3), (13, 13), (13,) * 6, (13, 13))
    t = default_kernel_sizes((3, 3, 18, 3))[2]
    assert t[0::2] == (13,) * 9 and t[1::2] == (3,) * 9
    s = default_kernel_sizes((3, 3, 27, 3))[2]
    assert [i for i, k in enumerate(s) if k == 13] == list(range(0, 27, 3))
    with pytest.raises(InvalidInputError, match="kernel_sizes"):
        UniRepLKNet(depths=(1, 2, 3, 4), dims=(8, 16, 32, 64))
    with pytest.raises(InvalidInputError, match="do not match"):
        UniRepLKNet(depths=(1, 1, 1, 1), dims=(8, 16, 32, 64), kernel_sizes=((3,), (3, 3), (3,), (3,)))


@pytest.mark.parametrize("k", [1, 2, 4, 6, 8, 19, 21])
def test_unsupported_kernel_sizes_raise(k):
    with pytest.raises(ValueError, match="kernel_size"):
        UniRepLKNetBlock(8, k)


def test_unknown_constructor_argument_is_an_error():
    """The official class swallowed typos through **kwargs (spec §13.5); ours raises."""
    with pytest.raises(TypeError):
        UniRepLKNet(disable_iGEMM=True)  # type: ignore[call-arg]


@pytest.mark.parametrize("variant", [pytest.param(v, marks=pytest.mark.slow) if v in BIG else v for v in VARIANTS])
def test_forward_backward_small_input(variant):
    model = up.create_model(f"unireplknet_{variant}", num_classes=7, drop_path_rate=0.1)
    x = torch.randn(1, 3, 45, 61, requires_grad=True)
    out = model(x)
    assert out.shape == (1, 7)
    out.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def _small(**kw) -> UniRepLKNet:
    kw.setdefault("kernel_sizes", ((3,), (13,), (7, 0), (5,)))
    return UniRepLKNet(depths=(1, 1, 2, 1), dims=(8, 16, 32, 64), **kw)


def test_head_api_and_num_classes_zero():
    m = _small(num_classes=5).eval()
    x = torch.randn(2, 3, 37, 53)
    f = m.forward_features(x)
    assert f.shape == (2, 64, 2, 2)  # ceil(37/32), ceil(53/32)
    assert m.forward_head(f, pre_logits=True).shape == (2, 64)
    torch.testing.assert_close(m.forward_head(f), m(x))
    m.reset_classifier(3)
    assert m(x).shape == (2, 3) and m.get_classifier().out_features == 3
    m.reset_classifier(0)
    assert m(x).shape == (2, 64)
    assert _small(num_classes=0)(x).shape == (2, 64)


def test_head_init_scale_and_init():
    m = _small(num_classes=10, head_init_scale=0.001)
    ref = _small(num_classes=10)
    assert m.head.weight.std().item() < ref.head.weight.std().item() * 0.01
    w = ref.stages[1][0].pwconv1[1].weight
    assert 0.015 < w.std().item() < 0.025 and ref.stages[1][0].gamma.eq(1e-6).all()


@pytest.mark.parametrize("out_indices", [(0, 1, 2, 3), (1, 3), (2,)])
def test_features_only_strides(out_indices):
    m = up.create_model("unireplknet_a", features_only=True, out_indices=out_indices).eval()
    x = torch.randn(1, 3, 77, 93)
    feats = m(x)
    sizes = {0: (20, 24), 1: (10, 12), 2: (5, 6), 3: (3, 3)}
    dims = (40, 80, 160, 320)
    assert [tuple(f.shape[1:]) for f in feats] == [(dims[i], *sizes[i]) for i in out_indices]
    assert [fi["reduction"] for fi in m.feature_info] == [2 ** (i + 2) for i in out_indices]
    assert not hasattr(m, "head")
    assert m.forward_features(x).shape == (1, 320, 3, 3)


def test_input_errors():
    m = _small(num_classes=3)
    with pytest.raises(InvalidInputError, match="4-D"):
        m(torch.randn(3, 32, 32))
    with pytest.raises(InvalidInputError, match="in_chans"):
        m(torch.randn(1, 1, 32, 32))


def test_gradient_checkpointing_same_outputs_and_grads():
    torch.manual_seed(1)
    m = _small(num_classes=4)
    x = torch.randn(2, 3, 40, 40)
    out1 = m(x)
    out1.sum().backward()
    g1 = [p.grad.clone() for p in m.parameters()]
    m.zero_grad()
    m.set_grad_checkpointing(True)
    assert all(b.with_cp for b in m.modules() if isinstance(b, UniRepLKNetBlock))
    x2 = x.clone().requires_grad_(True)  # checkpointing engages when the block input requires grad
    out2 = m(x2)
    out2.sum().backward()
    torch.testing.assert_close(out1, out2)
    for a, b in zip(g1, [p.grad for p in m.parameters()], strict=True):
        torch.testing.assert_close(a, b)


def test_drop_path_schedule_and_behaviour():
    m = up.create_model("unireplknet_a", drop_path_rate=0.3)
    rates = [b.drop_path.drop_prob if hasattr(b.drop_path, "drop_prob") else 0.0
             for b in m.modules() if isinstance(b, UniRepLKNetBlock)]
    assert rates[0] == 0.0 and rates[-1] == pytest.approx(0.3) and rates == sorted(rates)
    x = torch.randn(4, 3, 32, 32)
    m.eval()
    torch.testing.assert_close(m(x), m(x))


def test_export_deploy_form():
    m = _small(num_classes=6).eval().reparameterize()
    x = torch.randn(2, 3, 45, 51)
    ep = torch.export.export(m, (x,))
    torch.testing.assert_close(ep.module()(x), m(x), atol=1e-5, rtol=1e-5)
    traced = torch.jit.trace(m, x)
    torch.testing.assert_close(traced(x), m(x), atol=1e-5, rtol=1e-5)


def test_no_print_in_construction_or_reparam(capsys):
    """The official code prints tables and per-block notes (spec §13.1); ours stays silent."""
    m = UniRepLKNet(depths=(1, 1, 1, 1), dims=(8, 16, 32, 64), kernel_sizes=((13,), (3,), (13,), (0,)),
                    with_cp=True, drop_path_rate=0.2)
    m.reparameterize()
    UniRepLKNet(depths=(1, 1, 1, 1), dims=(8, 16, 32, 64), kernel_sizes=((13,), (3,), (13,), (0,)), deploy=True)
    assert capsys.readouterr().out == ""


def test_grn_channels_first_equals_official_nhwc():
    grn = GRN(12)
    with torch.no_grad():
        grn.gamma.normal_()
        grn.beta.normal_()
    x = torch.randn(2, 12, 9, 7)
    nhwc = grn(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
    gx = torch.linalg.vector_norm(x.permute(0, 2, 3, 1), dim=(1, 2), keepdim=True)  # official formula
    nx = gx / (gx.mean(-1, keepdim=True) + 1e-6)
    ref = ((grn.gamma * nx + 1) * x.permute(0, 2, 3, 1) + grn.beta).permute(0, 3, 1, 2)
    torch.testing.assert_close(nhwc, ref, atol=1e-5, rtol=1e-5)
    for xf in (x, x.contiguous(memory_format=torch.channels_last)):
        torch.testing.assert_close(grn.forward_channels_first(xf), ref, atol=1e-5, rtol=1e-5)


def test_layouts_and_inference_fast_path_agree(official_a):
    """channels-last vs NCHW, autograd vs inference (fused oneDNN) paths: the same logits."""
    train_sd, _, io = official_a
    m = up.create_model("unireplknet_a").eval()
    load_official(m, train_sd)
    x = io["input"][:1, :, :97, :129]
    ref = m(x).detach()  # grad enabled: eager, non-fused path
    with torch.no_grad():
        fast = m(x)
        m.channels_last = False
        nchw = m(x)
    torch.testing.assert_close(fast, ref, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(nchw, ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("channels_first", [False, True])
def test_grn_gradient_is_finite_on_an_all_zero_channel(channels_first: bool) -> None:
    """A channel that is exactly zero everywhere (GELU underflow) must not give NaN gradients (torch.norm doesn't)."""
    from uniperception.layers.norm import GRN

    g = GRN(4)
    torch.nn.init.normal_(g.gamma)
    x = torch.randn(2, 3, 3, 4)
    x[..., 1] = 0
    ref = x.clone().requires_grad_()
    gx = torch.norm(ref, p=2, dim=(1, 2), keepdim=True)
    expected = ref * (g.gamma * (gx / (gx.mean(-1, keepdim=True) + 1e-6)) + 1) + g.beta
    inp = (x.permute(0, 3, 1, 2) if channels_first else x).clone().requires_grad_()
    out = g.forward_channels_first(inp) if channels_first else g(inp)
    out = out.permute(0, 2, 3, 1) if channels_first else out
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6)
    out.square().sum().backward()
    expected.square().sum().backward()
    grad = inp.grad.permute(0, 2, 3, 1) if channels_first else inp.grad
    assert torch.isfinite(grad).all()
    torch.testing.assert_close(grad, ref.grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("layout", ["nhwc", "nchw", "channels_last"])
@pytest.mark.parametrize("with_beta", [True, False])
@pytest.mark.parametrize("chunked", [False, True])
def test_grn_handwritten_backward_matches_autograd_of_the_official_formula(
    layout: str, with_beta: bool, chunked: bool, monkeypatch
) -> None:
    """Training GRN's own backward: input, gamma and beta gradients equal autograd's of the official maths,
    also where the forward sums its squares a sample at a time (channels-innermost layouts)."""
    import uniperception.layers.norm as norm

    calls = []
    real = norm._chunked_sum_of_products
    monkeypatch.setattr(norm, "_chunked_sum_of_products", lambda a, b: calls.append(real(a, b)) or calls[-1])
    if chunked:
        monkeypatch.setattr(norm, "_SQUARES_CHUNK_BYTES", 5 * 7 * 6 * 8)  # one float64 sample per chunk
    g = torch.Generator().manual_seed(1)
    grn = GRN(6, use_bias=with_beta).double()
    with torch.no_grad():
        grn.gamma.copy_(torch.randn(grn.gamma.shape, generator=g, dtype=torch.float64))
        if grn.beta is not None:
            grn.beta.copy_(torch.randn(grn.beta.shape, generator=g, dtype=torch.float64))
    x = torch.randn(3, 5, 7, 6, generator=g, dtype=torch.float64)  # NHWC, odd spatial sizes
    x[1, ..., 2] = 0  # an all-zero channel
    up_grad = torch.randn(3, 5, 7, 6, generator=g, dtype=torch.float64)

    ref_x = x.clone().requires_grad_()
    gx = torch.linalg.vector_norm(ref_x, dim=(1, 2), keepdim=True)
    ref = (grn.gamma * (gx / (gx.mean(-1, keepdim=True) + 1e-6)) + 1) * ref_x
    if grn.beta is not None:
        ref = ref + grn.beta
    ref_params = torch.autograd.grad(ref, [ref_x, *grn.parameters()], up_grad)

    inp = x.clone() if layout == "nhwc" else x.permute(0, 3, 1, 2)
    if layout == "nchw":
        inp = inp.contiguous()
    inp = inp.requires_grad_()
    out = grn(inp) if layout == "nhwc" else grn.forward_channels_first(inp)
    grad_out = up_grad if layout == "nhwc" else up_grad.permute(0, 3, 1, 2)
    got = torch.autograd.grad(out, [inp, *grn.parameters()], grad_out)
    got_x = got[0] if layout == "nhwc" else got[0].permute(0, 2, 3, 1)
    torch.testing.assert_close(out if layout == "nhwc" else out.permute(0, 2, 3, 1), ref.detach())
    torch.testing.assert_close(got_x, ref_params[0])
    for a, b in zip(got[1:], ref_params[1:], strict=True):
        torch.testing.assert_close(a, b)
    ran_chunked = any(c is not None for c in calls)
    assert ran_chunked == (chunked and layout != "nchw")  # channels-innermost layouts only


def test_inplace_inference_matches_and_can_be_turned_off_for_hooks() -> None:
    """Inference scales block temporaries in place: same logits; hooks see intact outputs when switched off."""
    from _utils import randomize_

    m = UniRepLKNet(depths=(1, 1, 2, 1), dims=(16, 32, 48, 64), kernel_sizes=((3,), (13,), (13, 0), (7,)),
                    num_classes=5).eval()
    randomize_(m, seed=3)
    x = torch.randn(2, 3, 67, 45)
    ref = m(x).detach()  # autograd on: nothing in place
    block = m.stages[1][0]
    seen: list[torch.Tensor] = []
    block.norm.register_forward_hook(lambda mod, inp, out: seen.append(out))  # SE's input
    with torch.no_grad():
        fast = m(x)
        hooked = seen[-1].clone()
        block.inplace_inference = False
        slow = m(x)
    torch.testing.assert_close(fast, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(slow, ref, atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        stage_in = m.downsample_layers[1](m.stages[0](m.downsample_layers[0](x.contiguous(
            memory_format=torch.channels_last))))
        intact = block.norm(block.dwconv(stage_in))
    torch.testing.assert_close(seen[-1], intact)  # switched off: the hook kept the true output
    assert not torch.allclose(hooked, intact)  # switched on: SE had scaled it in place afterwards


def test_grn_chunked_sum_of_squares_in_inference(monkeypatch):
    """Inference GRN squares a few samples at a time (in cache); the result equals the one-pass formula, in
    both layouts, and autograd still gets the plain differentiable path."""
    import uniperception.layers.norm as norm

    monkeypatch.setattr(norm, "_SQUARES_CHUNK_BYTES", 3 * 13 * 11 * 4 * 2)  # 2 samples a chunk, 7 samples
    grn = GRN(13)
    with torch.no_grad():
        grn.gamma.normal_()
        grn.beta.normal_()
    x = torch.randn(7, 13, 3, 11).contiguous(memory_format=torch.channels_last)
    gx = torch.linalg.vector_norm(x, dim=(2, 3), keepdim=True)
    want = grn.gamma.view(1, -1, 1, 1) * (x * (gx / (gx.mean(1, keepdim=True) + 1e-6))) + grn.beta.view(1, -1, 1, 1) + x
    assert norm._chunked_sum_of_squares(x) is not None
    torch.testing.assert_close(norm._chunked_sum_of_squares(x), x.square().sum((2, 3)))
    with torch.no_grad():
        torch.testing.assert_close(grn.forward_channels_first(x), want, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(grn(x.permute(0, 2, 3, 1)), want.permute(0, 2, 3, 1), rtol=1e-5, atol=1e-5)
    assert norm._chunked_sum_of_squares(x.contiguous()) is None  # channels innermost only
    assert norm._chunked_sum_of_squares(x.requires_grad_()) is None


def test_deploy_feed_forward_in_sample_chunks_matches(monkeypatch) -> None:
    """Deploy-form CPU inference runs the feed-forward a few samples at a time (fused residual add): the
    logits equal the whole-batch path, and autograd / a non-deploy block keeps the plain path."""
    from _utils import randomize_

    import uniperception.layers.unireplknet_block as ub

    m = UniRepLKNet(depths=(1, 1, 1, 1), dims=(8, 16, 24, 32), kernel_sizes=((3,), (13,), (7,), (3,)),
                    num_classes=5).eval()
    randomize_(m, seed=5)
    x = torch.randn(5, 3, 61, 47)
    with torch.no_grad():
        train_form = m(x)
        m.reparameterize()
        monkeypatch.setattr(ub, "_FFN_CHUNK_BYTES", 1 << 40)
        whole = m(x)
        # 2 samples a chunk at the first stage (32 hidden channels, 16×12 map), chunks of 2, 2, 1
        monkeypatch.setattr(ub, "_FFN_CHUNK_MIN_SAMPLE_BYTES", 32 * 16 * 12 * 4)
        monkeypatch.setattr(ub, "_FFN_CHUNK_BYTES", 2 * 32 * 16 * 12 * 4)
        block = m.stages[0][0]
        probe = torch.randn(5, 8, 16, 12).contiguous(memory_format=torch.channels_last)
        assert block._ffn_chunk(probe) == (2 if ub.onednn_fusion_available() else 0)
        calls: list[int] = []
        real = ub.conv1x1_add_
        monkeypatch.setattr(ub, "conv1x1_add_", lambda out, *a: calls.append(out.shape[0]) or real(out, *a))
        chunked = m(x)
    torch.testing.assert_close(chunked, whole, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(chunked, train_form, atol=1e-4, rtol=1e-4)
    if ub.onednn_fusion_available():
        assert calls == [2, 2, 1]  # only the first stage's map is large enough
    assert block._ffn_chunk(probe) == 0  # autograd on (outside no_grad): the whole batch


def test_conv1x1_add_matches_eager() -> None:
    """``out += conv1x1(x)`` fused (float32 CPU, channels-last) and eager (float64 / NCHW) agree."""
    from uniperception.ops.fused import conv1x1_add_

    for dtype, fmt in ((torch.float32, torch.channels_last), (torch.float64, torch.contiguous_format)):
        x = torch.randn(3, 6, 5, 7, dtype=dtype).contiguous(memory_format=fmt)
        w, b = torch.randn(4, 6, dtype=dtype), torch.randn(4, dtype=dtype)
        acc = torch.randn(3, 4, 5, 7, dtype=dtype).contiguous(memory_format=fmt)
        want = acc + F.conv2d(x, w[:, :, None, None], b)
        with torch.no_grad():
            got = conv1x1_add_(acc, x, w, b)
        assert got.data_ptr() == acc.data_ptr()
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_feed_forward_chunking_applies_to_unireplknet_a_first_stage() -> None:
    """The chunked deploy feed-forward is meant for UniRepLKNet-A's first stage at 224² (hidden 160×56²,
    1.9 MiB per sample): pin that it applies there (2 samples a chunk) and not at the second stage."""
    import uniperception.layers.unireplknet_block as ub

    if not ub.onednn_fusion_available():
        pytest.skip("oneDNN fused convolution unavailable")
    first, second = UniRepLKNetBlock(40, 3, deploy=True).eval(), UniRepLKNetBlock(80, 13, deploy=True).eval()
    cl = torch.channels_last
    with torch.no_grad():
        assert first._ffn_chunk(torch.empty(16, 40, 56, 56).contiguous(memory_format=cl)) == 2
        assert first._ffn_chunk(torch.empty(2, 40, 56, 56).contiguous(memory_format=cl)) == 0  # one chunk
        assert first._ffn_chunk(torch.empty(16, 40, 56, 56)) == 0  # NCHW input
        assert second._ffn_chunk(torch.empty(16, 80, 28, 28).contiguous(memory_format=cl)) == 0


@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("training", [True, False])
def test_batch_norm_scaled_equals_bn_then_layer_scale(momentum, training) -> None:
    """The layer scale folded into the BatchNorm's affine parameters: same output, same gradients for the
    input, BN weight/bias and the scale, same running statistics and counter, in both modes."""
    from uniperception.layers.norm import batch_norm_scaled

    g = torch.Generator().manual_seed(0)
    bn = nn.BatchNorm2d(6, momentum=momentum).double()
    with torch.no_grad():
        bn.weight.copy_(torch.rand(6, generator=g, dtype=torch.float64) + 0.5)
        bn.bias.copy_(torch.randn(6, generator=g, dtype=torch.float64))
        bn.running_mean.copy_(torch.randn(6, generator=g, dtype=torch.float64))
        bn.running_var.copy_(torch.rand(6, generator=g, dtype=torch.float64) + 0.5)
    ref = copy.deepcopy(bn)
    bn.train(training), ref.train(training)
    scale = nn.Parameter(torch.randn(6, generator=g, dtype=torch.float64))
    x = (torch.randn(3, 6, 5, 7, generator=g, dtype=torch.float64) * 2 + 1).requires_grad_()
    x = x.contiguous(memory_format=torch.channels_last)
    gy = torch.randn(3, 6, 5, 7, generator=g, dtype=torch.float64)
    for _ in range(2):  # twice: the cumulative-average momentum depends on the counter
        out = batch_norm_scaled(bn, x, scale)
        want = ref(x) * scale.view(1, -1, 1, 1)
        torch.testing.assert_close(out, want, rtol=1e-12, atol=1e-12)
    grads = torch.autograd.grad(out, (x, bn.weight, bn.bias, scale), gy)
    wants = torch.autograd.grad(want, (x, ref.weight, ref.bias, scale), gy)
    for a, b in zip(grads, wants, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        torch.testing.assert_close(getattr(bn, name), getattr(ref, name), rtol=1e-12, atol=0)
    assert int(bn.num_batches_tracked) == (2 if training else 0)


def test_batch_norm_scaled_keeps_module_semantics_where_it_cannot_fold() -> None:
    """A hooked BatchNorm or a SyncBatchNorm runs as a module call (its hooks fire), then the scale."""
    from uniperception.layers.norm import batch_norm_scaled

    bn = nn.BatchNorm2d(4).eval()
    seen = []
    bn.register_forward_hook(lambda m, i, o: seen.append(o))
    x, s = torch.randn(2, 4, 3, 3), torch.rand(4) + 0.5
    out = batch_norm_scaled(bn, x, s)
    assert len(seen) == 1
    torch.testing.assert_close(out, seen[0] * s.view(1, -1, 1, 1))
    assert batch_norm_scaled(bn, x, None) is not None and len(seen) == 2
