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


# ------------------------------------------------------------------------------------------------ int8
def test_export_int8(bundle, tmp_path):
    import onnxruntime as ort

    from uniperception.export import INT8_TOLERANCE

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        f32 = export(str(bundle), tmp_path / "m.onnx")
        report = export(str(bundle), tmp_path / "m.int8.onnx", quantize="int8")
    assert report.quantize == "int8" and report.tolerance == INT8_TOLERANCE
    assert report.max_rel_diff <= report.tolerance and 0.0 <= report.top1_agreement <= 1.0
    summary = report.summary()
    assert "int8" in summary and "top-1 agreement" in summary and f"{INT8_TOLERANCE:g}" in summary
    assert report.path.stat().st_size < f32.path.stat().st_size  # int8 weights make a smaller file
    meta = json.loads(report.sidecar.read_text())
    q = meta["quantization"]
    assert q["dtype"] == "int8" and q["method"] == "dynamic" and q["quantized_nodes"] >= 8  # 2 per block + head
    assert q["op_types"] == ["MatMul", "Gemm"] and q["size_bytes"] == report.path.stat().st_size
    assert meta["verification"]["tolerance"] == INT8_TOLERANCE and "top1_agreement" in meta["verification"]
    assert json.loads(f32.sidecar.read_text())["quantization"] is None
    # the file loads in onnxruntime and matches eager float32 within the reported tolerance, same top-1
    sess = ort.InferenceSession(str(report.path), providers=["CPUExecutionProvider"])
    p = Perceiver.from_pretrained(bundle).eval()
    x = torch.randn(16, *p.adapter.preprocess(np.zeros((40, 40, 3), dtype=np.uint8)).shape[1:],
                    generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        ref = p(x).numpy()
    got = sess.run(None, {"input": x.numpy()})[0]
    diff = np.abs(got - ref).max()
    assert diff <= report.tolerance * np.abs(ref).max()
    top2 = np.sort(ref, axis=1)[:, -2:]
    clear = top2[:, 1] - top2[:, 0] > 2 * diff  # where quantisation cannot flip the winner
    assert clear.sum() >= 8
    np.testing.assert_array_equal(got.argmax(1)[clear], ref.argmax(1)[clear])
    assert (got.argmax(1) == ref.argmax(1)).mean() >= 0.75


def test_export_int8_bad_options(bundle, tmp_path):
    from uniperception.errors import InvalidInputError

    with pytest.raises(InvalidInputError, match="quantize"):
        export(str(bundle), tmp_path / "m.onnx", quantize="int4")
    with pytest.raises(InvalidInputError, match="format='onnx'"):
        export(str(bundle), tmp_path / "m.pt2", format="pt2", quantize="int8")
    with pytest.raises(ExportError):  # the same errors are ExportErrors too
        export(str(bundle), tmp_path / "m.onnx", quantize="fp16")
    assert not list(tmp_path.iterdir())


def test_export_int8_cli(bundle, tmp_path):
    out = tmp_path / "m.onnx"
    res = CliRunner().invoke(app, ["export", str(bundle), str(out), "--format", "onnx", "--quantize", "int8"])
    assert res.exit_code == 0, res.output
    assert "int8" in res.output and "top-1 agreement" in res.output and "max |diff|" in res.output
    assert json.loads(out.with_name("m.onnx.json").read_text())["quantization"]["dtype"] == "int8"
    res = CliRunner().invoke(app, ["export", str(bundle), str(out), "--quantize", "int4"])
    assert res.exit_code == 2 and "quantize" in res.output
