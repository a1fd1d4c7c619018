"""Export of the re-parameterised network, verified on the spot, for every format."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch
from _utils import randomize_
from typer.testing import CliRunner

from uniperception import Perceiver
from uniperception.cli import app
from uniperception.export import FORMATS, ExportError, export

SMALL = {"depths": (1, 1, 1, 1), "dims": (8, 16, 32, 64), "kernel_sizes": ((3,), (13,), (7,), (3,))}


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    torch.manual_seed(0)
    p = Perceiver("image", labels=["a", "b", "c"], adapter={"size": 40, "crop_pct": 1.0}, backbone_kwargs=SMALL)
    randomize_(p.backbone, 1)
    return p.save_pretrained(tmp_path_factory.mktemp("bundle") / "b")


@pytest.mark.parametrize("fmt", FORMATS)
def test_export_bundle_every_format(bundle, tmp_path, fmt):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        report = export(str(bundle), tmp_path / f"m.{fmt}", format=fmt)
    assert report.max_rel_diff <= 1e-4 and report.path.stat().st_size > 0
    meta = json.loads(report.sidecar.read_text())
    assert meta["form"] == "deploy" and meta["labels"] == ["a", "b", "c"] and meta["adapter"]["size"] == 40
    # the exported deploy form reproduces the *training-form* bundle's logits
    p = Perceiver.from_pretrained(bundle)
    x = p.adapter.preprocess(np.zeros((40, 40, 3), dtype=np.uint8))
    with torch.no_grad():
        ref = p(x)
    if fmt == "onnx":
        import onnxruntime as ort

        out = ort.InferenceSession(str(report.path)).run(None, {"input": x.numpy()})[0]
        np.testing.assert_allclose(out, ref.numpy(), atol=1e-4, rtol=1e-4)


def test_export_training_form_and_errors(tmp_path):
    from uniperception.backbones import UniRepLKNet

    m = randomize_(UniRepLKNet(num_classes=5, **SMALL), 2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        r = export(m, tmp_path / "t.onnx", training_form=True)
    assert json.loads(r.sidecar.read_text())["form"] == "training"
    assert any(isinstance(x, torch.nn.BatchNorm2d) for x in m.modules())  # the original is untouched
    with pytest.raises(ExportError, match="unknown export format"):
        export(m, tmp_path / "x.bin", format="tflite")


def test_export_cli(bundle, tmp_path):
    res = CliRunner().invoke(app, ["export", str(bundle), str(tmp_path / "m.pt2"), "--format", "pt2"])
    assert res.exit_code == 0, res.output
    assert "verified" in res.output
    res = CliRunner().invoke(app, ["export", str(tmp_path / "nothing"), str(tmp_path / "m.onnx")])
    assert res.exit_code == 2
