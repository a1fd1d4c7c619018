"""RepLKNet: official structure (keys, shapes, parameter counts), re-parameterisation, model API, checkpoints."""

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
from uniperception.backbones.replknet import RepLKNet
from uniperception.checkpoints import load_official
from uniperception.errors import CheckpointError, InvalidInputError
from uniperception.layers.replknet_blocks import ConvFFN, ReparamLargeKernelConv, RepLKBlock
from uniperception.ops import DepthwiseConv2d

# spec §1: parameters only (BN buffers excluded), num_classes=1000 — (training form, deploy form)
PARAMS = {
    "31b": (79_864_168, 79_527_272),
    "31l": (172_671_016, 172_165_672),
    "xl": (335_435_752, 335_399_656),
}
# spec §7: state-dict key counts (training, deploy)
KEY_COUNTS = {"31b": (1171, 931), "31l": (1171, 931), "xl": (1027, 931)}

#: whether uniperception.backbones itself imports this family (the lead's wiring); needed by the timm bridge
WIRED = hasattr(backbones, "RepLKNet")


def _manifest(reference: Path, name: str) -> list[tuple[str, list[int]]]:
    return list(json.loads((reference / "official_keys" / f"{name}.json").read_text()).items())


def _shapes(model: nn.Module) -> list[tuple[str, list[int]]]:
    return [(k, list(v.shape)) for k, v in model.state_dict().items()]


@pytest.mark.parametrize("variant", list(PARAMS))
def test_official_keys_shapes_and_param_counts(reference, variant):
    name = f"replknet_{variant}"
    with torch.device("meta"):
        train = up.create_model(name)
        deploy = up.create_model(name, deploy=True)
        merged = up.create_model(name, small_kernel_merged=True)
    assert _shapes(train) == _manifest(reference, name)
    assert _shapes(deploy) == _manifest(reference, name + "_deploy") == _shapes(merged)
    assert (len(train.state_dict()), len(deploy.state_dict())) == KEY_COUNTS[variant]
    assert (sum(p.numel() for p in train.parameters()), sum(p.numel() for p in deploy.parameters())) == PARAMS[variant]
    train.reparameterize()  # on meta: layout only
    assert _shapes(train) == _manifest(reference, name + "_deploy")
    assert train.is_deploy and deploy.is_deploy


def test_every_large_kernel_conv_uses_the_engine():
    m = _small()
    lk = [c for c in m.modules() if isinstance(c, ReparamLargeKernelConv)]
    assert lk and all(isinstance(c.lkb_origin.conv, DepthwiseConv2d) and isinstance(c.small_conv.conv, DepthwiseConv2d)
                      for c in lk)
    m.reparameterize()
    assert all(isinstance(c.lkb_reparam, DepthwiseConv2d) and c.lkb_reparam.padding == (c.kernel_size // 2,) * 2
               for c in lk)
    m.set_conv_impl("fft")
    assert {c.impl for c in m.modules() if isinstance(c, DepthwiseConv2d)} == {"fft"}


# ---------------------------------------------------------------------------------------------- small models
def _small(**kw) -> RepLKNet:
    kw.setdefault("num_classes", 5)
    kw.setdefault("large_kernel_sizes", (13, 11, 9, 7))
    return RepLKNet(layers=(1, 1, 2, 1), channels=(8, 16, 24, 32), **kw)


XL_STYLE = {"small_kernel": None, "dw_ratio": 1.5}


def _reference_forward(sd: dict[str, torch.Tensor], x: torch.Tensor, layers: tuple[int, ...]) -> torch.Tensor:
    """An independent functional forward written from the spec (§2–§4), training form, eval mode."""

    def bn(t, p):
        return F.batch_norm(t, sd[p + ".running_mean"], sd[p + ".running_var"], sd[p + ".weight"], sd[p + ".bias"],
                            False, 0.0, 1e-5)

    def cbn(t, p, stride=1, relu=False):
        w = sd[p + ".conv.weight"]
        groups = t.shape[1] if w.shape[1] == 1 else 1
        kh, kw = w.shape[-2:]
        t = bn(F.conv2d(t, w, None, stride, (kh // 2, kw // 2), 1, groups), p + ".bn")
        return F.relu(t) if relu else t

    x = cbn(x, "stem.0", 2, True)
    x = cbn(x, "stem.1", 1, True)
    x = cbn(x, "stem.2", 1, True)
    x = cbn(x, "stem.3", 2, True)
    for s, n in enumerate(layers):
        for j in range(n):
            p = f"stages.{s}.blocks.{2 * j}"
            y = cbn(bn(x, p + ".prelkb_bn"), p + ".pw1", relu=True)
            lk = cbn(y, p + ".large_kernel.lkb_origin")
            if p + ".large_kernel.small_conv.conv.weight" in sd:
                lk = lk + cbn(y, p + ".large_kernel.small_conv")
            x = x + cbn(F.relu(lk), p + ".pw2")
            p = f"stages.{s}.blocks.{2 * j + 1}"
            y = cbn(bn(x, p + ".preffn_bn"), p + ".pw1")
            x = x + cbn(F.gelu(y), p + ".pw2")
        if s < len(layers) - 1:
            x = cbn(x, f"transitions.{s}.0", 1, True)
            x = cbn(x, f"transitions.{s}.1", 2, True)
    x = bn(x, "norm").mean((2, 3))
    return F.linear(x, sd["head.weight"], sd["head.bias"])


@pytest.mark.parametrize("cfg", [{}, XL_STYLE], ids=["small_kernel", "xl_style"])
def test_matches_functional_reference_float64(cfg):
    m = randomize_(_small(**cfg), 1).double().eval()
    x = torch.randn(2, 3, 53, 37, dtype=torch.float64)
    with torch.no_grad():
        out = m(x)
    ref = _reference_forward(m.state_dict(), x, m.layers)
    assert (out - ref).abs().max().item() <= 1e-10


def test_numerics_match_official_conventions():
    m = _small()
    bns = [b for b in m.modules() if isinstance(b, nn.BatchNorm2d)]
    assert bns and all(b.eps == 1e-5 and b.momentum == 0.1 for b in bns)
    assert all(g.approximate == "none" for g in m.modules() if isinstance(g, nn.GELU))
    blk = m.stages[0].blocks[0]
    assert isinstance(blk, RepLKBlock) and isinstance(blk.lk_nonlinear, nn.ReLU)
    assert isinstance(m.stages[0].blocks[1], ConvFFN)
    # no init function: PyTorch defaults (BN 1/0, conv kaiming-uniform bounded by 1/sqrt(fan_in))
    w = m.stages[0].blocks[0].large_kernel.lkb_origin.conv.weight
    assert w.abs().max() <= 1 / 13 and torch.equal(bns[0].weight, torch.ones_like(bns[0].weight))


@pytest.mark.parametrize("cfg", [{}, XL_STYLE], ids=["small_kernel", "xl_style"])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.float64, 1e-10)])
def test_reparam_equivalence_random_weights_and_bn_stats(cfg, dtype, tol):
    m = randomize_(_small(**cfg), 2).to(dtype).eval()
    x = torch.randn(2, 3, 71, 45, dtype=dtype)
    with torch.no_grad():
        ref = m(x)
        m.reparameterize()
        out = m(x)
    assert m.is_deploy and max_rel_err(out, ref) <= tol
    # the saved deploy dict reloads into a model built in deploy form and gives the same numbers, bit for bit
    built = _small(deploy=True, **cfg).to(dtype).eval()
    built.load_state_dict(m.state_dict(), strict=True)
    assert list(built.state_dict()) == list(m.state_dict())
    with torch.no_grad():
        assert torch.equal(built(x), out)


def test_reparam_is_idempotent_mode_independent_and_official_alias():
    m = randomize_(_small(), 3)
    a = copy.deepcopy(m).train().reparameterize()
    b = copy.deepcopy(m).eval().structural_reparam()
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb) and all(torch.equal(sa[k], sb[k]) for k in sa)
    a.reparameterize()
    up.reparameterize(a)
    assert all(torch.equal(a.state_dict()[k], sb[k]) for k in sb)
    assert not any(".lkb_origin." in k or ".small_conv." in k for k in sa)
    # everything but the large kernels keeps its BN (official deploy layout)
    assert any(k.endswith("pw1.bn.running_var") for k in sa) and "norm.running_var" in sa


def test_bfloat16_reparam_matches_float32_reparam():
    m = randomize_(_small(), 4).to(torch.bfloat16)
    ref = copy.deepcopy(m).float().reparameterize().state_dict()
    m.reparameterize()
    for k, v in m.state_dict().items():
        assert v.dtype == (torch.bfloat16 if v.is_floating_point() else torch.int64), k
        torch.testing.assert_close(v.float(), ref[k].to(v.dtype).float(), atol=1e-6, rtol=8e-3, msg=k)
    with torch.no_grad():
        assert torch.isfinite(m.eval()(torch.randn(1, 3, 40, 40).bfloat16())).all()


def test_forward_backward_small_input():
    m = _small(drop_path_rate=0.2)
    x = torch.randn(2, 3, 37, 45, requires_grad=True)
    out = m(x)
    assert out.shape == (2, 5)
    out.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    assert all(p.grad is not None for p in m.parameters())
    rates = [b.drop_path.drop_prob for s in m.stages for b in s.blocks if hasattr(b.drop_path, "drop_prob")]
    assert rates == sorted(rates) and rates[-1] == pytest.approx(0.2)
    # one rate per (RepLK, FFN) pair
    pair = m.stages[2].blocks
    assert pair[0].drop_path.drop_prob == pair[1].drop_path.drop_prob


def test_tiny_and_odd_inputs_run():
    """Any H, W ≥ 1 works (spec §2): strided convs round up."""
    m = _small().eval()
    with torch.no_grad():
        assert m.forward_features(torch.randn(1, 3, 5, 7)).shape == (1, 32, 1, 1)
        assert m(torch.randn(1, 3, 1, 1)).shape == (1, 5)


def test_gradient_checkpointing_same_outputs_and_grads():
    torch.manual_seed(1)
    m = _small()
    x = torch.randn(1, 3, 35, 33)
    out1 = m(x)
    out1.sum().backward()
    g1 = [p.grad.clone() for p in m.parameters()]
    m.zero_grad()
    m.set_grad_checkpointing(True)
    assert all(s.use_checkpoint for s in m.stages)
    out2 = m(x)
    out2.sum().backward()
    torch.testing.assert_close(out1, out2)
    for a, b in zip(g1, [p.grad for p in m.parameters()], strict=True):
        torch.testing.assert_close(a, b)
    assert all(s.use_checkpoint for s in _small(with_cp=True).stages)
    assert all(s.use_checkpoint for s in _small(use_checkpoint=True).stages)


def test_head_api_and_num_classes_zero():
    m = randomize_(_small(), 5).eval()
    x = torch.randn(2, 3, 37, 53)
    f = m.forward_features(x)
    assert f.shape == (2, 32, 2, 2)  # ceil(37/32), ceil(53/32)
    assert m.forward_head(f, pre_logits=True).shape == (2, 32)
    torch.testing.assert_close(m.forward_head(f), m(x))
    m.reset_classifier(3)
    assert m(x).shape == (2, 3) and m.get_classifier().out_features == 3
    m.reset_classifier(0)
    assert m(x).shape == (2, 32)
    assert _small(num_classes=0)(x).shape == (2, 32)


def test_channel_arguments_and_aliases():
    assert _small(in_chans=1)(torch.randn(1, 1, 33, 33)).shape == (1, 5)
    assert _small(in_channels=4).stem[0].conv.in_channels == 4
    with pytest.raises(InvalidInputError, match="disagree"):
        _small(in_chans=1, in_channels=3)
    m = _small()
    with pytest.raises(InvalidInputError, match="4-D"):
        m(torch.randn(3, 32, 32))
    with pytest.raises(InvalidInputError, match="in_chans"):
        m(torch.randn(1, 1, 32, 32))
    with pytest.raises(TypeError):
        RepLKNet(disable_iGEMM=True)  # type: ignore[call-arg]


@pytest.mark.parametrize(
    "kw,match",
    [
        ({"out_indices": (0, 1)}, "features_only"),
        ({"norm_intermediate_features": True}, "features mode"),
        ({"features_only": True, "out_indices": ()}, "non-empty"),
        ({"num_classes": None, "out_indices": (4,)}, "subset"),
        ({"large_kernel_sizes": (13, 12, 9, 7)}, "odd"),
        ({"large_kernel_sizes": (13, 11, 9, 3)}, "small kernel"),
        ({"large_kernel_sizes": (13, 11, 9)}, "one entry per stage"),
    ],
)
def test_constructor_errors(kw, match):
    with pytest.raises(InvalidInputError, match=match):
        _small(**kw)


@pytest.mark.parametrize("out_indices", [(0, 1, 2, 3), (1, 3), (2,)])
def test_features_only_strides(out_indices):
    m = _small(features_only=True, out_indices=out_indices).eval()
    x = torch.randn(1, 3, 77, 93)
    with torch.no_grad():
        feats = m(x)
    sizes = {0: (20, 24), 1: (10, 12), 2: (5, 6), 3: (3, 3)}  # ceil at every stride-2 conv
    dims = (8, 16, 24, 32)
    assert [tuple(f.shape[1:]) for f in feats] == [(dims[i], *sizes[i]) for i in out_indices]
    assert [fi["reduction"] for fi in m.feature_info] == [2 ** (i + 2) for i in out_indices]
    assert not hasattr(m, "head") and not hasattr(m, "norm")
    assert m.forward_features(x).shape == (1, 32, 3, 3)
    with pytest.raises(InvalidInputError):
        m.forward_head(feats[-1])


def test_official_downstream_mode_and_intermediate_norms():
    """``num_classes=None, out_indices=...`` (the official downstream call) with XL's stage norms."""
    m = randomize_(_small(num_classes=None, out_indices=(0, 1, 2, 3), norm_intermediate_features=True), 6).eval()
    assert m.features_only and all(isinstance(s.norm, nn.BatchNorm2d) for s in m.stages)
    assert "stages.2.norm.running_var" in m.state_dict()
    x = torch.randn(1, 3, 64, 48)
    with torch.no_grad():
        feats = m(x)
        stages = m.forward_stages(x)
    for i, f in enumerate(feats):
        torch.testing.assert_close(f, m.stages[i].norm(stages[i]))
    assert not torch.allclose(feats[0], stages[0])


def test_create_model_features_only():
    with torch.device("meta"):
        m = up.create_model("replknet_31b", features_only=True, out_indices=(1, 2))
    assert [f["num_chs"] for f in m.feature_info] == [256, 512]
    assert not any(k.startswith(("norm.", "head.")) for k in m.state_dict())


def test_builder_defaults_follow_official_builders():
    with torch.device("meta"):
        m = up.create_model("replknet_xl")
    assert m.stages[0].blocks[0].large_kernel.small_kernel is None
    assert m.stages[0].blocks[0].pw1.conv.out_channels == 384  # dw_ratio 1.5
    rates = [b.drop_path.drop_prob for s in m.stages for b in s.blocks if hasattr(b.drop_path, "drop_prob")]
    assert rates[-1] == pytest.approx(0.3)
    assert not m.grad_checkpointing  # deliberately off (the official builders turn it on)
    assert up.get_pretrained_cfg("replknet_xl").mean == (0.5, 0.5, 0.5)
    assert up.get_pretrained_cfg("replknet_31b.in22k").num_classes == 21841


def test_no_print_in_construction_or_reparam(capsys):
    """The official RepLKBlock prints its drop-path module for every block (spec §12.5); ours stays silent."""
    m = _small(drop_path_rate=0.3, use_checkpoint=True)
    m.reparameterize()
    _small(deploy=True)
    assert capsys.readouterr().out == ""


def test_export_both_forms():
    """Spec §12.8: the official training form fails ONNX export (in-place add); ours exports in both forms."""
    m = randomize_(_small(), 7).eval()
    x = torch.randn(1, 3, 45, 51)
    for _ in range(2):
        ep = torch.export.export(m, (x,))
        torch.testing.assert_close(ep.module()(x), m(x), atol=1e-5, rtol=1e-5)
        m.reparameterize()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_training_step_and_reparam():
    m = randomize_(_small(), 12).cuda()
    x = torch.randn(2, 3, 71, 45, device="cuda")
    m(x).sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in m.parameters())
    m = m.double().eval()
    with torch.no_grad():
        ref = m(x.double())
        m.reparameterize()
        assert max_rel_err(m(x.double()), ref) <= 1e-10
        assert max_rel_err(m.float()(x).double(), ref) <= 1e-4


# ---------------------------------------------------------------------------------------------- checkpoints
def _official_file(tmp_path: Path, sd: dict[str, torch.Tensor], name: str = "latest.pth") -> Path:
    """A checkpoint as the official training script writes it (model / optimizer / epoch / args / EMA)."""
    path = tmp_path / name
    torch.save({
        "model": OrderedDict(sd),
        "optimizer": {"state": {}, "param_groups": []},
        "epoch": 299,
        "scaler": {},
        "args": argparse.Namespace(model="RepLKNet-31B", drop_path=0.5, lr=4e-3, input_size=224),
        "model_ema": OrderedDict((k, v.clone()) for k, v in sd.items()),
    }, path)
    return path


@pytest.fixture(scope="module")
def trained():
    """A randomised training-form model, its logits, and its deploy-form state dict and logits."""
    torch.manual_seed(0)
    m = randomize_(_small(), 8).eval()
    x = torch.randn(2, 3, 41, 55)
    with torch.no_grad():
        logits = m(x)
        dep = copy.deepcopy(m).reparameterize()
        logits_dep = dep(x)
    return dict(m.state_dict()), x, logits, dict(dep.state_dict()), logits_dep


def test_wrapped_official_pth_with_namespace_loads(tmp_path, trained):
    sd, x, logits, _, _ = trained
    m = _small().eval()
    report = load_official(m, _official_file(tmp_path, sd))
    assert report.ok and "unwrapped 'model'" in report.converted
    with torch.no_grad():
        assert torch.equal(m(x), logits)


def test_deploy_file_into_training_model(tmp_path, trained):
    _, x, _, dep_sd, logits_dep = trained
    m = _small().eval()
    report = load_official(m, _official_file(tmp_path, dep_sd))
    assert report.ok and m.is_deploy and any("re-parameterised" in c for c in report.converted)
    with torch.no_grad():
        assert torch.equal(m(x), logits_dep)


def test_training_dict_into_deploy_model(trained):
    sd, x, logits, dep_sd, _ = trained
    m = _small(deploy=True).eval()
    report = load_official(m, {"module": sd})
    assert report.ok and m.is_deploy
    with torch.no_grad():
        assert max_rel_err(m(x), logits) <= 1e-5
    for k, v in dep_sd.items():
        torch.testing.assert_close(m.state_dict()[k], v, atol=1e-6, rtol=1e-5, msg=k)


def test_features_model_from_classification_and_downstream_checkpoints(trained):
    sd, _, _, _, _ = trained
    m = _small(features_only=True, norm_intermediate_features=True).eval()
    before = m.stages[1].norm.running_var.clone()
    report = load_official(m, sd)
    assert report.ok
    assert {s.split(" ")[0] for s in report.skipped} >= {"norm.weight", "head.weight"}
    assert torch.equal(m.stages[1].norm.running_var, before)  # absent stage norms keep their init
    # an mmseg-style downstream file (backbone. prefix, decode head beside it) with its stage norms
    down = randomize_(copy.deepcopy(m), 9)
    wrapped = {"meta": {"iter": 160000}, "state_dict": {
        **{f"backbone.{k}": v for k, v in down.state_dict().items()},
        "decode_head.conv_seg.weight": torch.zeros(150, 512, 1, 1),
    }}
    report = load_official(m, wrapped)
    assert report.ok and torch.equal(m.stages[1].norm.running_var, down.stages[1].norm.running_var)


def test_adapt_head_and_strict_errors(trained):
    sd, _, _, _, _ = trained
    m = _small(num_classes=7)
    with pytest.raises(CheckpointError, match="adapt_head"):
        load_official(m, sd)
    head = m.head.weight.clone()
    report = load_official(m, sd, adapt_head=True)
    assert report.ok and torch.equal(m.head.weight, head)
    bad = {k: v for k, v in sd.items() if "stages.1.blocks.0.pw1" not in k}
    with pytest.raises(CheckpointError, match=r"stages\.1\.blocks\.0\.pw1"):
        load_official(_small(), bad)



def test_timm_reparameterize_model_gives_the_official_deploy_form():
    """timm's walker calls ``reparameterize()`` (and replaces children that have ``fuse()``): same result as ours."""
    pytest.importorskip("timm")
    from timm.utils import reparameterize_model

    m = randomize_(_small(), 9).eval()
    x = torch.randn(1, 3, 40, 40)
    with torch.no_grad():
        ref = m(x)
        dep = reparameterize_model(m)
        out = dep(x)
    ours = copy.deepcopy(m).reparameterize().state_dict()
    assert dep.is_deploy and not m.is_deploy and list(dep.state_dict()) == list(ours)
    assert max_rel_err(out, ref) <= 1e-4

@pytest.mark.skipif(not WIRED, reason="uniperception.backbones does not import replknet yet (lead's wiring)")
def test_timm_create_model():
    timm = pytest.importorskip("timm")
    assert "replknet_31b" in up.list_models()
    with torch.device("meta"):
        m = timm.create_model("replknet_31b", num_classes=10)
    assert isinstance(m, RepLKNet) and m.head.out_features == 10
    with torch.device("meta"):
        feats = timm.create_model("replknet_xl", features_only=True, out_indices=(3,))
    assert isinstance(feats, RepLKNet) and [f["num_chs"] for f in feats.feature_info] == [2048]
