"""Registry, pretrained tags and the timm bridge."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from _utils import max_rel_err, randomize_

import uniperception as up
from uniperception.backbones import UniRepLKNet
from uniperception.errors import UnknownModelError

ALL = [f"unireplknet_{v}" for v in ("a", "b", "f", "l", "n", "p", "s", "t", "xl")]


def test_list_models_patterns_and_tags():
    assert sorted(ALL) == [m for m in up.list_models("unireplknet_*")]
    assert up.list_models("unireplknet_?") == sorted(n for n in ALL if len(n) == 13)
    tagged = up.list_models("unireplknet_s*", pretrained=True)
    assert tagged == ["unireplknet_s.in1k", "unireplknet_s.in22k", "unireplknet_s.in22k_ft_in1k_384"]
    assert up.get_pretrained_cfg("unireplknet_s").tag == "in1k"  # a bare name picks the first listed
    assert up.get_pretrained_cfg("unireplknet_b").filename == "unireplknet_b_in22k_to_in1k_384_acc87.40.pth"
    assert up.get_pretrained_cfg("unireplknet_l.in22k").num_classes == 21841


def test_unknown_names_and_tags_are_clear_errors():
    with pytest.raises(UnknownModelError, match="unireplknet_a"):
        up.create_model("unireplknet_aa")
    with pytest.raises(ValueError, match="list_models"):
        up.create_model("resnet50")
    with pytest.raises(UnknownModelError, match="in22k"):
        up.create_model("unireplknet_a.in22k")


def test_create_model_kwargs_reach_the_model():
    m = up.create_model("unireplknet_a", num_classes=3, in_chans=1, deploy=True)
    assert isinstance(m, UniRepLKNet) and m.is_deploy
    assert m(torch.randn(1, 1, 33, 47)).shape == (1, 3)


def test_timm_create_model_and_reparameterize_model():
    timm = pytest.importorskip("timm")
    from timm.utils import reparameterize_model

    assert "unireplknet_a" in timm.list_models("unireplknet*")
    m = timm.create_model("unireplknet_a", num_classes=10)
    assert isinstance(m, UniRepLKNet) and m.head.out_features == 10
    randomize_(m, 3).eval()
    x = torch.randn(2, 3, 45, 39)
    with torch.no_grad():
        ref = m(x)
        dep = reparameterize_model(m)
        out = dep(x)
    assert dep is not m and dep.is_deploy and not m.is_deploy
    assert max_rel_err(out, ref) <= 1e-4
    with torch.device("meta"):
        built = timm.create_model("unireplknet_a", num_classes=10, deploy=True)
    assert {k: v.shape for k, v in dep.state_dict().items()} == {k: v.shape for k, v in built.state_dict().items()}
    feats = timm.create_model("unireplknet_a", features_only=True, out_indices=(1, 2))
    assert [f.shape[1] for f in feats(torch.randn(1, 3, 64, 64))] == [80, 160]


@pytest.mark.parametrize("order", ["uniperception first", "timm first"])
def test_timm_registration_import_order(order):
    pytest.importorskip("timm")
    first, second = ("uniperception", "timm") if order == "uniperception first" else ("timm", "uniperception")
    code = (
        f"import {first}, {second}, sys\n"
        "m = timm.create_model('unireplknet_f', num_classes=0)\n"
        "assert type(m).__name__ == 'UniRepLKNet', type(m)\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def test_import_does_not_import_timm():
    code = "import sys, uniperception; print('timm' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "False", out.stderr


def test_timm_prefix_builds_a_timm_backbone_with_the_backbone_contract() -> None:
    pytest.importorskip("timm")
    from uniperception.backbones.timm_backbone import TimmBackbone

    m = up.create_model("timm:resnet18", in_chans=2)
    assert isinstance(m, TimmBackbone) and m.num_features == 512
    maps = m.forward_features(torch.randn(1, 2, 40, 56))
    assert maps.shape == (1, 512, 2, 2)
    with pytest.raises(up.errors.InvalidInputError):
        m.forward_features(torch.randn(2, 40, 56))
    with pytest.raises(up.errors.UnknownModelError):
        up.create_model("timm:no_such_net")
    p = up.Perceiver("audio", backbone="timm:convnext_atto", labels=["a", "b", "c"])
    wav = torch.randn(16000)
    assert len(p.classify(wav, sample_rate=16000, top_k=2)) == 2
