"""The command line: demo, models, convert."""

from __future__ import annotations

import torch
from _utils import randomize_
from safetensors.torch import load_file
from typer.testing import CliRunner

import uniperception as up
from uniperception.checkpoints import save_state_dict
from uniperception.cli import app
from uniperception.demo import run_reparam_demo

runner = CliRunner()


def test_demo_agrees_and_reports(tmp_path):
    res = runner.invoke(app, ["demo", "--no-bundles", "--no-forecast", "--size", "64", "--batch", "2", "--repeats", "1"])
    assert res.exit_code == 0, res.output
    assert "agree" in res.output and "speed-up" in res.output


def test_demo_result_figures():
    r = run_reparam_demo("unireplknet_a", image_size=48, batch=2, repeats=1)
    assert r.params_train == 4_649_060 and r.params_deploy == 4_437_300
    assert r.max_abs_diff <= 1e-4 * max(1.0, r.max_logit)
    assert len(r.top5) == 5 and r.time_deploy > 0


def test_demo_bad_image_is_a_clear_error(tmp_path):
    bad = tmp_path / "x.png"
    bad.write_bytes(b"not an image")
    res = runner.invoke(app, ["demo", "--no-bundles", "--no-forecast", "--image", str(bad), "--size", "32", "--batch",
                              "1", "--repeats", "1"])  # fmt: skip
    assert res.exit_code == 2 and "cannot read image" in res.output


def test_models_lists_registry():
    res = runner.invoke(app, ["models", "unireplknet_*"])
    assert res.exit_code == 0 and res.output.split() == up.list_models("unireplknet_*")
    res = runner.invoke(app, ["models", "unireplknet_s*", "--pretrained"])
    assert "unireplknet_s_in22k_pretrain.pth" in res.output


def test_convert_to_deploy_safetensors(tmp_path):
    m = randomize_(up.create_model("unireplknet_a", num_classes=10), 1).eval()
    src = save_state_dict(m.state_dict(), tmp_path / "ckpt.pth")
    dst = tmp_path / "out" / "deploy.safetensors"
    res = runner.invoke(app, ["convert", str(src), str(dst), "--model", "unireplknet_a", "--num-classes", "10"])
    assert res.exit_code == 0, res.output
    dep = up.create_model("unireplknet_a", num_classes=10, deploy=True).eval()
    dep.load_state_dict(load_file(str(dst)))
    x = torch.randn(1, 3, 50, 50)
    with torch.no_grad():
        torch.testing.assert_close(dep(x), m(x), atol=1e-4, rtol=1e-4)
    res = runner.invoke(app, ["convert", str(tmp_path / "missing.pth"), str(dst)])
    assert res.exit_code == 2 and "not found" in res.output


def test_benchmark_command_small():
    res = runner.invoke(app, ["benchmark", "--batch", "1", "--size", "48", "--repeats", "1", "--impl", "native",
                              "--impl", "auto"])
    assert res.exit_code == 0, res.output
    assert "deploy/auto" in res.output and "speed-up" in res.output
    res = runner.invoke(app, ["benchmark", "--batch", "1", "--size", "48", "--repeats", "1", "--mode", "sideways"])
    assert res.exit_code == 2 and "mode" in res.output


def test_convert_official_to_bundle(reference, tmp_path):
    from uniperception import Perceiver

    src = reference / "vectors" / "unireplknet_a_random.safetensors"
    res = runner.invoke(app, ["convert", str(src), str(tmp_path / "bundle"), "--variant", "a"])
    assert res.exit_code == 0, res.output
    p = Perceiver.from_pretrained(tmp_path / "bundle")
    io = load_file(str(reference / "vectors" / "unireplknet_a_io.safetensors"))
    with torch.no_grad():
        torch.testing.assert_close(p(io["input"]), io["logits_reparam"], atol=1e-4, rtol=0)
    assert p.backbone.is_deploy and len(p.labels) == 1000


def test_erf_command(tmp_path):
    out = tmp_path / "erf.png"
    res = runner.invoke(app, ["erf", "--model", "slak_t", "--size", "64", "--num-images", "2", "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert "area ratio" in res.output and out.stat().st_size > 0 and out.with_suffix(".npy").is_file()
    res = runner.invoke(app, ["erf", "--model", "slak_t", "--images", str(tmp_path / "none")])
    # the console wraps long lines (a long temporary path moves the break)
    assert res.exit_code == 2 and "does not exist" in " ".join(res.output.split())


def test_cli_keeps_freed_memory_unless_told_not_to(monkeypatch):
    # the CLI is an application: it raises glibc's thresholds once (no page faults per call); env var opts out
    import uniperception._alloc as alloc

    calls = []
    monkeypatch.setattr(alloc, "keep_freed_memory", lambda: calls.append(1) or True)
    assert runner.invoke(app, ["models"]).exit_code == 0
    assert calls == [1]
    monkeypatch.setenv("UNIPERCEPTION_KEEP_FREED_MEMORY", "0")
    assert runner.invoke(app, ["models"]).exit_code == 0
    assert calls == [1]
