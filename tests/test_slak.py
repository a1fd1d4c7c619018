"""SLaK: official structure, the per-axis padding quirk, both inference forms, model API, checkpoints."""

from __future__ import annotations

import argparse
import copy
import json
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from _utils import max_rel_err, randomize_
from torch import nn

import uniperception as up
import uniperception.backbones as backbones
from uniperception.backbones.slak import SLaK
from uniperception.checkpoints import load_official
from uniperception.errors import CheckpointError, InvalidInputError
from uniperception.layers.slak_blocks import SLaKBlock, SLaKLargeKernelConv
from uniperception.ops import DepthwiseConv2d

# spec §1: dense parameter counts (num_classes=1000, kernels 51/49/47/13/5, width 1.3, Decom, bn)
PARAMS = {"t": 50_703_838, "s": 91_131_820, "b": 157_950_792}
KEY_COUNTS = {"t": 470, "s": 920, "b": 920}
WIRED = hasattr(backbones, "SLaK")


def _manifest(reference: Path, name: str) -> list[tuple[str, list[int]]]:
    return list(json.loads((reference / "official_keys" / f"{name}.json").read_text()).items())


def _shapes(model: nn.Module) -> list[tuple[str, list[int]]]:
    return [(k, list(v.shape)) for k, v in model.state_dict().items()]


def _deploy_manifest(train: list[tuple[str, list[int]]]) -> list[tuple[str, list[int]]]:
    """The dense layout derived from the training manifest: each block's LK entries → lkb_reparam."""
    out: list[tuple[str, list[int]]] = []
    for k, shape in train:
        if ".large_kernel." not in k:
            out.append((k, shape))
        elif k.endswith(".large_kernel.LoRA1.conv.weight"):
            p = k.split(".large_kernel.")[0] + ".large_kernel.lkb_reparam"
            out += [(p + ".weight", [shape[0], 1, shape[2], shape[2]]), (p + ".bias", [shape[0]])]
    return out


def _rect_manifest(train: list[tuple[str, list[int]]]) -> list[tuple[str, list[int]]]:
    out: list[tuple[str, list[int]]] = []
    for k, shape in train:
        if ".large_kernel." in k and ".bn." in k:
            continue
        out.append((k, shape))
        if ".large_kernel." in k and k.endswith(".conv.weight"):
            out.append((k[: -len("weight")] + "bias", [shape[0]]))
    return out


@pytest.mark.parametrize("variant", list(PARAMS))
def test_official_keys_shapes_and_param_counts(reference, variant):
    name = f"slak_{variant}"
    with torch.device("meta"):
        train = up.create_model(name)
        deploy = up.create_model(name, deploy=True)
    manifest = _manifest(reference, name)
    assert _shapes(train) == manifest and len(manifest) == KEY_COUNTS[variant]
    assert sum(p.numel() for p in train.parameters()) == PARAMS[variant]
    assert _shapes(deploy) == _deploy_manifest(manifest)
    rect = copy.deepcopy(train).reparameterize(form="rect")  # on meta: layout only
    assert _shapes(rect) == _rect_manifest(manifest) and rect.reparam_form == "rect"
    train.reparameterize()
    assert _shapes(train) == _shapes(deploy) and train.is_deploy


def test_width_factor_truncates_and_kernels_per_stage():
    with torch.device("meta"):
        m = up.create_model("slak_t")
    assert m.dims == (124, 249, 499, 998)
    lk = m.stages[0][0].large_kernel
    assert tuple(lk.LoRA1.conv.weight.shape[-2:]) == (51, 5) and tuple(lk.LoRA2.conv.weight.shape[-2:]) == (5, 51)
    assert all(isinstance(c.conv, DepthwiseConv2d) for c in (lk.LoRA1, lk.LoRA2, lk.small_conv))
    assert lk.LoRA1.conv.padding == (25, 2) and lk.LoRA2.conv.padding == (2, 25)  # per axis (spec §4.2)
    assert tuple(m.stages[3][0].large_kernel.LoRA1.conv.weight.shape[-2:]) == (13, 5)


# ---------------------------------------------------------------------------------------------- padding quirk
def _official_op(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """The official CUDA op, literally (spec §4.2): stride-1 depthwise cross-correlation, zero padding kh//2 rows
    and kw//2 columns, output the size of the input — whatever padding the module was given."""
    c, _, kh, kw = w.shape
    h, wd = x.shape[-2:]
    xp = x.new_zeros(x.shape[0], c, h + 2 * (kh // 2), wd + 2 * (kw // 2))
    xp[:, :, kh // 2 : kh // 2 + h, kw // 2 : kw // 2 + wd] = x
    out = x.new_zeros(x.shape)
    for a in range(kh):
        for b in range(kw):
            out += w[:, 0, a, b].view(1, c, 1, 1) * xp[:, :, a : a + h, b : b + wd]
    return out


def _bn(t: torch.Tensor, bn: nn.BatchNorm2d) -> torch.Tensor:
    return (t - bn.running_mean.view(1, -1, 1, 1)) / torch.sqrt(bn.running_var.view(1, -1, 1, 1) + bn.eps) * \
        bn.weight.view(1, -1, 1, 1) + bn.bias.view(1, -1, 1, 1)


def _official_lk(lk: SLaKLargeKernelConv, x: torch.Tensor) -> torch.Tensor:
    out = 0
    for name in ("LoRA1", "LoRA2", "lkb_origin", "small_conv"):
        if hasattr(lk, name):
            br = getattr(lk, name)
            y = _official_op(x, br.conv.weight)
            out = out + (_bn(y, br.bn) if "bn" in br._modules else y)
    return out


@pytest.mark.parametrize("m,n,hw", [(11, 3, (9, 14)), (7, 5, (4, 13)), (13, 3, (17, 6)), (3, 5, (8, 8))])
def test_padding_quirk_matches_official_op(m, n, hw):
    lk = randomize_(SLaKLargeKernelConv(4, m, n), m).double().eval()
    x = torch.randn(2, 4, *hw, dtype=torch.float64)
    with torch.no_grad():
        ours = lk(x)
        ref = _official_lk(lk, x)
        assert (ours - ref).abs().max().item() <= 1e-12
        # each branch on its own (the rectangles are where the nominal padding would go wrong)
        for br in (lk.LoRA1, lk.LoRA2):
            assert (br.conv(x) - _official_op(x, br.conv.weight)).abs().max().item() <= 1e-12
        # the nominal padding the official module passes (kernel_size // 2 on both axes) is *not* what runs
        if m > n:
            nominal = F.conv2d(x, lk.LoRA1.conv.weight, None, 1, m // 2, 1, 4)
            assert nominal.shape[-1] == hw[1] + (m - n) and nominal.shape != ours.shape


# ---------------------------------------------------------------------------------------------- small models
def _small(**kw) -> SLaK:
    kw.setdefault("num_classes", 5)
    kw.setdefault("kernel_size", (13, 11, 9, 7, 3))
    return SLaK(depths=(1, 1, 2, 1), dims=(8, 16, 24, 32), width_factor=1.0, **kw)


def _randomize(m: nn.Module, seed: int) -> nn.Module:
    """``randomize_`` plus the layer scales it does not know about (SLaK blocks)."""
    randomize_(m, seed)
    g = torch.Generator().manual_seed(seed + 1000)
    with torch.no_grad():
        for b in m.modules():
            if isinstance(b, SLaKBlock) and b.gamma is not None:
                sign = torch.where(torch.rand(b.gamma.shape, generator=g) < 0.3, -1.0, 1.0)
                b.gamma.copy_((torch.rand(b.gamma.shape, generator=g) * 0.6 + 0.2) * sign)
    return m


def _reference_forward(m: SLaK, x: torch.Tensor) -> torch.Tensor:
    """An independent functional forward from the spec (§2–§4), with the literal official conv op."""

    def ln_cf(t, ln):  # channels-first LN, explicit formula (biased variance)
        u = t.mean(1, keepdim=True)
        s = (t - u).pow(2).mean(1, keepdim=True)
        return (t - u) / torch.sqrt(s + 1e-6) * ln.weight.view(1, -1, 1, 1) + ln.bias.view(1, -1, 1, 1)

    for i in range(4):
        ds = m.downsample_layers[i]
        if i == 0:
            x = ln_cf(F.conv2d(x, ds[0].weight, ds[0].bias, 4), ds[1])
        else:
            x = F.conv2d(ln_cf(x, ds[0]), ds[1].weight, ds[1].bias, 2)
        for blk in m.stages[i]:
            y = _official_lk(blk.large_kernel, x).permute(0, 2, 3, 1)
            y = F.layer_norm(y, (y.shape[-1],), blk.norm.weight, blk.norm.bias, 1e-6)
            y = F.linear(F.gelu(F.linear(y, blk.pwconv1.weight, blk.pwconv1.bias)), blk.pwconv2.weight,
                         blk.pwconv2.bias)
            x = x + (y * blk.gamma).permute(0, 3, 1, 2)
    x = F.layer_norm(x.mean((2, 3)), (x.shape[1],), m.norm.weight, m.norm.bias, 1e-6)
    return F.linear(x, m.head.weight, m.head.bias)


def test_matches_functional_reference_float64():
    m = _randomize(_small(), 1).double().eval()
    x = torch.randn(2, 3, 45, 37, dtype=torch.float64)
    with torch.no_grad():
        out = m(x)
        ref = _reference_forward(m, x)
    assert (out - ref).abs().max().item() <= 1e-10


def test_numerics_and_init_follow_official():
    m = _small(num_classes=10, head_init_scale=0.01)
    assert all(x.eps == 1e-6 for x in m.modules() if isinstance(x, nn.LayerNorm))
    assert all(x.eps == 1e-5 for x in m.modules() if isinstance(x, nn.BatchNorm2d))
    assert all(x.approximate == "none" for x in m.modules() if isinstance(x, nn.GELU))
    blk = m.stages[2][1]
    assert blk.gamma.eq(1e-6).all()
    w = blk.large_kernel.LoRA1.conv.weight  # trunc-normal std 0.02 also on the LK branch convs (spec §5)
    assert 0.012 < w.std().item() < 0.028 and blk.pwconv1.bias.eq(0).all()
    assert m.head.weight.std().item() < 0.02 * 0.02
    assert _small(layer_scale_init_value=0).stages[0][0].gamma is None


@pytest.mark.parametrize("form", ["dense", "rect"])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.float64, 1e-10)])
def test_reparam_equivalence_both_forms(form, dtype, tol):
    m = _randomize(_small(), 2).to(dtype).eval()
    x = torch.randn(2, 3, 71, 45, dtype=dtype)
    with torch.no_grad():
        ref = m(x)
        m.reparameterize(form=form)
        out = m(x)
    assert m.reparam_form == form and max_rel_err(out, ref) <= tol
    if form == "dense":  # the dense dict reloads into a model built with deploy=True, bit-exact
        built = _small(deploy=True).to(dtype).eval()
        built.load_state_dict(m.state_dict(), strict=True)
        with torch.no_grad():
            assert torch.equal(built(x), out)
    else:  # and a rect model can go on to dense
        with torch.no_grad():
            m.reparameterize()
            assert m.is_deploy and max_rel_err(m(x), ref) <= tol


@pytest.mark.parametrize("kw", [{"kernel_size": (7, 7, 5, 5, 9)}, {"Decom": False}, {"bn": False}],
                         ids=["short_side_larger", "dense_lkb_origin", "no_bn"])
def test_other_official_constructions_reparameterise(kw):
    m = _randomize(_small(**kw), 3).double().eval()
    x = torch.randn(1, 3, 39, 50, dtype=torch.float64)
    with torch.no_grad():
        ref = m(x)
        m.reparameterize()
        assert max_rel_err(m(x), ref) <= 1e-10
    assert m.is_deploy


def test_convnext_baseline_construction():
    """``kernel_size=[7,7,7,7,100], Decom=False``: one 7×7 conv + BN per block, no small branch (spec §1)."""
    m = _small(kernel_size=(7, 7, 7, 7, 100), Decom=False)
    lk = m.stages[1][0].large_kernel
    assert set(lk.state_dict()) == {"lkb_origin.conv.weight"} | {f"lkb_origin.bn.{s}" for s in
                                                                  ("weight", "bias", "running_mean", "running_var",
                                                                   "num_batches_tracked")}
    assert _small(Decom=None).stages[0][0].large_kernel.decom is False  # the official default None = dense
    assert _small(LoRA=False).stages[0][0].large_kernel.decom is False  # detection copy's name


def test_reparam_idempotent_and_dense_cannot_go_back():
    m = _randomize(_small(), 4)
    a = copy.deepcopy(m).train().reparameterize()
    b = copy.deepcopy(m).eval()
    up.reparameterize(b)  # the generic walker picks the dense form
    assert all(torch.equal(a.state_dict()[k], v) for k, v in b.state_dict().items())
    a.reparameterize()
    assert all(torch.equal(a.state_dict()[k], v) for k, v in b.state_dict().items())
    with pytest.raises(InvalidInputError, match="rect"):
        a.reparameterize(form="rect")
    with pytest.raises(InvalidInputError, match="form"):
        m.reparameterize(form="square")


def test_bfloat16_reparam_matches_float32_reparam():
    m = _randomize(_small(), 5).to(torch.bfloat16)
    ref = copy.deepcopy(m).float().reparameterize().state_dict()
    m.reparameterize()
    for k, v in m.state_dict().items():
        torch.testing.assert_close(v.float(), ref[k].to(v.dtype).float(), atol=1e-6, rtol=8e-3, msg=k)
    with torch.no_grad():
        assert torch.isfinite(m.eval()(torch.randn(1, 3, 40, 40).bfloat16())).all()


def test_forward_backward_small_input():
    m = _small(drop_path_rate=0.2, layer_scale_init_value=0.5)
    x = torch.randn(2, 3, 45, 61, requires_grad=True)
    out = m(x)
    assert out.shape == (2, 5)
    out.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    assert all(p.grad is not None for p in m.parameters())


def test_gradient_checkpointing_same_outputs_and_grads():
    torch.manual_seed(1)
    m = _small(layer_scale_init_value=0.5)
    x = torch.randn(2, 3, 40, 40)
    out1 = m(x)
    out1.sum().backward()
    g1 = [p.grad.clone() for p in m.parameters()]
    m.zero_grad()
    m.set_grad_checkpointing(True)
    x2 = x.clone().requires_grad_(True)
    out2 = m(x2)
    out2.sum().backward()
    torch.testing.assert_close(out1, out2)
    for a, b in zip(g1, [p.grad for p in m.parameters()], strict=True):
        torch.testing.assert_close(a, b)


def test_head_api_input_checks_and_floored_sizes():
    m = _randomize(_small(), 6).eval()
    x = torch.randn(2, 3, 71, 45)
    f = m.forward_features(x)
    assert f.shape == (2, 32, 2, 1)  # floor(71/32), floor(45/32)
    assert m.forward_head(f, pre_logits=True).shape == (2, 32)
    torch.testing.assert_close(m.forward_head(f), m(x))
    m.reset_classifier(3)
    assert m(x).shape == (2, 3) and m.get_classifier().out_features == 3
    m.reset_classifier(0)
    assert m(x).shape == (2, 32)
    with pytest.raises(InvalidInputError, match="at least 32"):
        m(torch.randn(1, 3, 31, 64))
    with pytest.raises(InvalidInputError, match="in_chans"):
        m(torch.randn(1, 1, 32, 32))
    with pytest.raises(InvalidInputError, match="5 entries"):
        _small(kernel_size=(13, 11, 9, 7))
    with pytest.raises(InvalidInputError, match="odd"):
        _small(kernel_size=(13, 11, 9, 8, 3))
    with pytest.raises(TypeError):
        SLaK(sparse=True)  # type: ignore[call-arg]


@pytest.mark.parametrize("out_indices", [(0, 1, 2, 3), (1, 3), (0,)])
def test_features_only_strides(out_indices):
    m = _small(features_only=True, out_indices=out_indices).eval()
    x = torch.randn(1, 3, 77, 93)
    with torch.no_grad():
        feats = m(x)
    sizes = {0: (19, 23), 1: (9, 11), 2: (4, 5), 3: (2, 2)}  # floored
    assert [tuple(f.shape[1:]) for f in feats] == [((8, 16, 24, 32)[i], *sizes[i]) for i in out_indices]
    assert [fi["reduction"] for fi in m.feature_info] == [2 ** (i + 2) for i in out_indices]
    assert {k.split(".")[0] for k in m.state_dict() if k.startswith("norm")} == {f"norm{i}" for i in out_indices}
    assert m.forward_features(x).shape == (1, 32, 2, 2)
    if out_indices == (0,):  # only stage 0 needed: small inputs are fine
        assert m(torch.randn(1, 3, 8, 8))[0].shape == (1, 8, 2, 2)


def test_set_conv_impl_keeps_outputs():
    m = _randomize(_small(), 7).eval()
    x = torch.randn(1, 3, 64, 40)
    with torch.no_grad():
        ref = m(x)
        m.set_conv_impl("fft")
        assert {c.impl for c in m.modules() if isinstance(c, DepthwiseConv2d)} == {"fft"}
        assert max_rel_err(m(x), ref) <= 1e-4
        m.reparameterize()
        assert {c.impl for c in m.modules() if isinstance(c, DepthwiseConv2d)} == {"fft"}
        assert max_rel_err(m(x), ref) <= 1e-4


def test_export_inference_forms():
    m = _randomize(_small(), 10).eval()
    x = torch.randn(1, 3, 45, 51)
    for form in ("rect", "dense"):
        m.reparameterize(form=form)
        ep = torch.export.export(m, (x,))
        torch.testing.assert_close(ep.module()(x), m(x), atol=1e-5, rtol=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_training_step_and_both_forms():
    """Rectangular kernels through the CUDA dispatch (Triton when available), forward/backward and both forms."""
    m = _randomize(_small(), 11).cuda()
    x = torch.randn(2, 3, 71, 45, device="cuda")
    m(x).sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in m.parameters())
    m.eval()
    with torch.no_grad():
        ref = m.double()(x.double())
        for form in ("rect", "dense"):
            m.reparameterize(form=form)
            assert max_rel_err(m(x.double()), ref) <= 1e-10
        assert max_rel_err(m.float()(x).double(), ref) <= 1e-4


def test_no_print(capsys):
    _small(drop_path_rate=0.3).reparameterize(form="rect").reparameterize()
    assert capsys.readouterr().out == ""


# ---------------------------------------------------------------------------------------------- checkpoints
@pytest.fixture(scope="module")
def trained():
    torch.manual_seed(0)
    m = _randomize(_small(), 8).eval()
    x = torch.randn(2, 3, 41, 55)
    with torch.no_grad():
        out = {"train": m(x)}
        sds = {"train": dict(m.state_dict())}
        for form in ("rect", "dense"):
            f = copy.deepcopy(m).reparameterize(form=form)
            out[form] = f(x)
            sds[form] = dict(f.state_dict())
    return sds, x, out


def _official_file(tmp_path: Path, sd: dict[str, torch.Tensor]) -> Path:
    path = tmp_path / "checkpoint-best-ema.pth"
    torch.save({"model": OrderedDict(sd), "optimizer": {"state": {}, "param_groups": []}, "epoch": "best-ema",
                "scaler": {}, "args": argparse.Namespace(model="SLaK_tiny", Decom=True, kernel_size=[51, 49, 47, 13, 5],
                                                         width_factor=1.3, sparse=True, sparsity=0.4)}, path)
    return path


def test_wrapped_pth_with_namespace_and_old_decom_names(tmp_path, trained):
    sds, x, out = trained
    old = OrderedDict((k.replace(".LoRA1.", ".Decom1.").replace(".LoRA2.", ".Decom2."), v)
                      for k, v in sds["train"].items())
    assert any(".Decom1." in k for k in old)
    m = _small().eval()
    report = load_official(m, _official_file(tmp_path, old))
    assert report.ok and sum("Decom" in c for c in report.converted) == sum(".Decom" in k for k in old)
    with torch.no_grad():
        assert torch.equal(m(x), out["train"])


@pytest.mark.parametrize("ckpt_form", ["train", "rect", "dense"])
@pytest.mark.parametrize("model_form", ["train", "rect", "dense"])
def test_every_form_loads_into_every_form(ckpt_form, model_form, trained):
    sds, x, out = trained
    m = _small(deploy=model_form == "dense")
    if model_form == "rect":
        m.reparameterize(form="rect")
    report = load_official(m.eval(), {"state_dict": {f"module.{k}": v for k, v in sds[ckpt_form].items()}})
    assert report.ok
    later = max(ckpt_form, model_form, key=("train", "rect", "dense").index)
    assert m.reparam_form == later
    with torch.no_grad():
        assert max_rel_err(m(x), out[ckpt_form]) <= 1e-5


def test_features_model_from_classification_checkpoint(trained):
    sds, _, _ = trained
    m = _small(features_only=True, out_indices=(1, 2)).eval()
    report = load_official(m, sds["train"])
    assert report.ok and any(s.startswith("head.weight") for s in report.skipped)
    assert any("norm1.weight absent" in c for c in report.converted)
    assert m.norm1.weight.eq(1).all()  # official downstream loading leaves norm{i} at their init


def test_adapt_head_and_strict_errors(trained):
    sds, _, _ = trained
    with pytest.raises(CheckpointError, match="adapt_head"):
        load_official(_small(num_classes=9), sds["train"])
    assert load_official(_small(num_classes=9), sds["train"], adapt_head=True).ok
    with pytest.raises(CheckpointError, match="lkb_origin"):  # a SLaK checkpoint into a Decom=False model (#19)
        load_official(_small(Decom=False), sds["train"])



def test_timm_reparameterize_model_gives_the_official_deploy_form():
    """timm's walker calls ``reparameterize()`` (and replaces children that have ``fuse()``): same result as ours."""
    pytest.importorskip("timm")
    from timm.utils import reparameterize_model

    m = _randomize(_small(layer_scale_init_value=0.5), 9).eval()
    x = torch.randn(1, 3, 40, 40)
    with torch.no_grad():
        ref = m(x)
        dep = reparameterize_model(m)
        out = dep(x)
    ours = copy.deepcopy(m).reparameterize().state_dict()
    assert dep.is_deploy and not m.is_deploy and list(dep.state_dict()) == list(ours)
    assert max_rel_err(out, ref) <= 1e-4

@pytest.mark.skipif(not WIRED, reason="uniperception.backbones does not import slak yet (lead's wiring)")
def test_timm_create_model():
    timm = pytest.importorskip("timm")
    with torch.device("meta"):
        m = timm.create_model("slak_t", num_classes=10)
    assert isinstance(m, SLaK) and m.head.out_features == 10
