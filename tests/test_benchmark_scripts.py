"""Smoke tests of the scripts in ``benchmarks/``: they run end to end on tiny inputs (no timing is asserted)."""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def _script(name: str, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.syspath_prepend(str(ROOT))
    return importlib.import_module(f"benchmarks.{name}")


def test_large_kernel_speed_quick(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
                                  tmp_path: Path) -> None:
    lks = _script("large_kernel_speed", monkeypatch)
    monkeypatch.setenv("UNIPERCEPTION_CONV_IMPL", "fft")  # must be ignored: "auto" has to mean auto
    out = tmp_path / "lk.json"
    threads = torch.get_num_threads()
    try:  # one thread: a 2-thread OpenMP run is many times slower on a busy 2-core machine
        rc = lks.main(["--quick", "--models", "unireplknet_a", "slak_t", "--img-size", "32", "--batch", "1",
                       "--repeats", "1", "--threads", "1", "--json", str(out)])
    finally:
        torch.set_num_threads(threads)  # main() sets the process-wide thread count
    assert rc == 0
    table = capsys.readouterr().out
    assert "| unireplknet_a | deploy |" in table and "| slak_t | dense |" in table
    assert "Command: `" in table and "--quick" in table
    res = json.loads(out.read_text())
    rows = {(m["arch"], m["form"], m["engine"]) for m in res["models"]}
    assert rows == {
        ("unireplknet_a", "training", "auto"), ("unireplknet_a", "deploy", "auto"),
        ("unireplknet_a", "deploy", "native"), ("slak_t", "training", "auto"),
        ("slak_t", "rect", "auto"), ("slak_t", "rect", "native"),
        ("slak_t", "dense", "auto"), ("slak_t", "dense", "native"),
    }
    for m in res["models"]:
        assert len(m["batch_times_s"]) == 1
        if m["form"] != "training":
            assert m["rel_err_vs_training"] <= 1e-4
            assert "vs_training" in m["ratios"]
        if m["engine"] == "auto" and m["form"] != "training":
            assert "auto_vs_off" in m["ratios"]
    assert res["meta"]["ignored_conv_impl_env"] == "fft"


def _one_thread_main(module, argv: list[str]) -> int:
    threads = torch.get_num_threads()
    try:  # main() sets the process-wide thread count
        return module.main(argv)
    finally:
        torch.set_num_threads(threads)


def test_backbone_speed_quick(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
                              tmp_path: Path) -> None:
    bs = _script("backbone_speed", monkeypatch)
    out = tmp_path / "bs.json"
    rc = _one_thread_main(bs, ["--quick", "--models", "unireplknet_a", "convnext_atto", "--forms", "deploy",
                               "--img-size", "32", "--batch", "2", "--repeats", "2", "--max-rounds", "2",
                               "--latency-iters", "1", "--threads", "1", "--json", str(out)])
    assert rc == 0
    assert "convnext_atto" in capsys.readouterr().out
    res = json.loads(out.read_text())
    assert {m["key"] for m in res["models"]} >= {"convnext_atto"} and len(res["peak_rounds"]["mm_gflops"]) == 2
    for m in res["models"]:
        assert [len(v) for v in m["batch_times_s"].values()] == [2]  # one time per round, both rounds
        assert len(m["latency_times_s"]) == 2


def test_export_speed_quick(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
                            tmp_path: Path) -> None:
    es = _script("export_speed", monkeypatch)
    out = tmp_path / "es.json"
    rc = _one_thread_main(es, ["--quick", "--no-accuracy", "--batch", "1", "--repeats", "2", "--max-rounds", "2",
                               "--threads", "1", "--json", str(out)])
    assert rc == 0
    assert "eager deploy" in capsys.readouterr().out
    res = json.loads(out.read_text())
    assert res["runtimes"] and all(len(r["batch_times_s"]["1"]) == 2 for r in res["runtimes"])


def test_gpu_dw_interpreter_smoke(tmp_path: Path) -> None:
    """The GPU benchmark end to end on the CPU, its Triton kernels run by Triton's interpreter."""
    pytest.importorskip("triton")
    out = tmp_path / "gpu.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "gpu_dw.py"), "--device", "cpu", "--shapes", "2@6",
         "--kernels", "3", "--batch", "1", "--dtypes", "fp32", "--repeats", "1", "--json", str(out)],
        capture_output=True, text=True, timeout=600, env={k: v for k, v in os.environ.items()
                                                          if k != "TRITON_INTERPRET"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| fwd | fp32 | 1 | 2@6² | 3×3 |" in proc.stdout and "| fwd+bwd | fp32 | 1 | 2@6² | 3×3 |" in proc.stdout
    res = json.loads(out.read_text())
    assert len(res["results"]) == 2
    for r in res["results"]:
        assert r["max_rel_err"]["triton"] <= 1e-4 and len(r["times_ms"]["triton"]) == 1


def test_gpu_dw_refuses_without_cuda() -> None:
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_dw.py"), "--kernels", "3"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "no CUDA device" in proc.stderr
