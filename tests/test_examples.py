"""Every example script runs end to end (tiny, untrained models; real decoding paths) in a subprocess."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
ARGS = {"forecast_series.py": ["--epochs", "2", "--backtest-windows", "0"]}


@pytest.mark.parametrize("script", sorted(p.name for p in EXAMPLES.glob("[!_]*.py")))
def test_example_runs(script):
    out = subprocess.run([sys.executable, str(EXAMPLES / script), *ARGS.get(script, [])],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip(), "the example printed nothing"


def test_cli_predict_subprocess(tmp_path):
    """The console script: a JSON prediction for an image with a saved bundle, and a one-line error."""
    import json

    import numpy as np
    from PIL import Image

    sys.path.insert(0, str(EXAMPLES))
    from _common import TINY_BACKBONE

    from uniperception import Perceiver

    Perceiver("image", labels=["a", "b"], adapter={"size": 32}, backbone_kwargs=TINY_BACKBONE).save_pretrained(
        tmp_path / "bundle")
    img = tmp_path / "x.png"
    Image.fromarray(np.zeros((40, 40, 3), dtype=np.uint8)).save(img)
    exe = Path(sys.executable).with_name("uniperception")
    out = subprocess.run([str(exe), "predict", str(img), "--model", str(tmp_path / "bundle"), "--json"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    res = json.loads(out.stdout)
    assert res[0]["file"] == str(img) and len(res[0]["predictions"]) == 2
    bad = subprocess.run([str(exe), "predict", str(tmp_path / "x.unknown")], capture_output=True, text=True,
                         timeout=300)
    assert bad.returncode == 2 and "modality" in bad.stdout + bad.stderr
