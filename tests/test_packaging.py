"""The package as users get it: the wheel's contents, version, typing marker, no stray top-level packages."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import uniperception

ROOT = Path(__file__).resolve().parents[1]


def test_version_and_typing_marker():
    assert uniperception.__version__.count(".") == 2
    assert (Path(uniperception.__file__).parent / "py.typed").is_file()


def test_wheel_contents(tmp_path):
    pytest.importorskip("build")
    out = subprocess.run(
        [sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(tmp_path), str(ROOT)],
        capture_output=True, text=True, timeout=300,
    )
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    (wheel,) = tmp_path.glob("uniperception-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    for required in ("uniperception/py.typed", "uniperception/backbones/unireplknet.py",
                     "uniperception/layers/reparam.py", "uniperception/checkpoints.py", "uniperception/cli.py"):
        assert required in names
    # adapters/datasets must never be top-level packages (they would shadow PyPI's `adapters`/`datasets`)
    assert {n.split("/")[0] for n in names if not n.startswith("uniperception")} <= {
        n.split("/")[0] for n in names if ".dist-info/" in n
    }
    assert any(n.endswith(".dist-info/licenses/LICENSE") or n.endswith("LICENSE") for n in names)
