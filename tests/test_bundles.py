"""The shipped pretrained bundles, the sample inputs and the main job (``uniperception demo``)."""

from __future__ import annotations

import json

import av
import numpy as np
import pytest
import soundfile as sf
from typer.testing import CliRunner

import uniperception as up
from uniperception.cli import app
from uniperception.demo import SAMPLES_DIR, demo_samples, run_bundle_demo, run_forecast_demo
from uniperception.errors import InvalidInputError
from uniperception.perceiver import BUNDLE_DIR

# modality, classes, the test accuracy each shipped file must reach (the target is 95 %; see the model
# cards and docs/benchmarks.md for what each file measured)
EXPECTED = {
    "unireplknet-a-keywords": ("audio", 12, 0.975),
    "unireplknet-a-motion": ("video", 8, 0.99),
    "unireplknet-a-shapes": ("points", 10, 0.98),
}


def test_samples_are_real_decodable_files() -> None:
    items = demo_samples()
    assert {it["modality"] for it in items} == {"audio", "video", "points"}
    for it in items:
        path = it["file"]
        if it["modality"] == "audio":
            wav, sr = sf.read(path)
            assert sr == 16000 and wav.shape == (16000,) and np.abs(wav).max() > 0.01
        elif it["modality"] == "video":
            with av.open(path) as c:
                assert sum(1 for _ in c.decode(video=0)) == 16
        else:
            from uniperception.datasets._common import import_open3d

            assert len(import_open3d().io.read_point_cloud(path).points) > 500
    assert (SAMPLES_DIR / "airline.csv").read_text().startswith("date,passengers\n1949-01-01,112")
    with pytest.raises(InvalidInputError):
        demo_samples(SAMPLES_DIR / "nowhere")


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_shipped_bundle_is_small_documented_and_accurate(name: str) -> None:
    assert name in up.list_bundles()
    d = BUNDLE_DIR / name
    assert (d / "model.safetensors").stat().st_size <= 10 * 2**20
    cfg = json.loads((d / "config.json").read_text())
    modality, classes, accuracy = EXPECTED[name]
    assert cfg["modality"] == modality and len(cfg["labels"]) == classes
    assert cfg["backbone"]["name"] == "unireplknet_a" and cfg["backbone"]["kwargs"]["deploy"] is True
    card = cfg["card"]
    assert "uniperception train --recipe" in card["command"]
    assert card["metrics"]["test"]["acc1"] >= accuracy  # measured on the file as shipped
    readme = (d / "README.md").read_text()
    assert "## Command" in readme and "## Metrics" in readme and "## Robustness" in readme
    model = up.Perceiver.from_pretrained(name)
    assert model.modality == modality and model.backbone.is_deploy


def test_bundle_demo_classifies_every_sample() -> None:
    rows = run_bundle_demo()
    assert {r.bundle for r in rows} == set(EXPECTED)
    assert len(rows) == len(demo_samples())
    for r in rows:
        assert len(r.predictions) == 3 and 0 <= r.predictions[0].score <= 1
    held_out_voice = [r for r in rows if "espeak" in r.file]
    assert held_out_voice and all(r.correct for r in held_out_voice)


def test_demo_command_prints_the_bundle_table() -> None:
    res = CliRunner().invoke(app, ["demo", "--no-forecast", "--no-reparam"])
    assert res.exit_code == 0, res.output
    assert "keyword-yes-espeak.wav" in res.output and "correct" in res.output


def test_forecast_demo_scores_the_held_out_year() -> None:
    r = run_forecast_demo(epochs=2)
    assert len(r.forecast) == 12 and str(r.forecast.index[0].date()) == "1961-01-01"
    assert {"uniperception", "seasonal_naive", "ridge_lags"} <= set(r.backtest.index)
    assert np.isfinite(r.backtest.to_numpy()).all()


def test_models_bundles_lists_metrics() -> None:
    res = CliRunner().invoke(app, ["models", "--bundles"])
    assert res.exit_code == 0
    assert all(name in res.output for name in EXPECTED) and "test accuracy" in res.output


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_shipped_bundle_reproduces_its_card_test_accuracy(name: str) -> None:
    """The shipped file, run through today's processors, scores what its model card says (guards the processors)."""
    import torch
    from torch.utils.data import DataLoader

    from uniperception.training import AdapterCollate, build_dataset

    cfg = json.loads((BUNDLE_DIR / name / "config.json").read_text())
    data = json.loads(cfg["card"]["data"])
    model = up.Perceiver.from_pretrained(name)
    correct = total = 0
    with torch.inference_mode():
        for x, y in DataLoader(build_dataset(data, "test"), batch_size=64, collate_fn=AdapterCollate(model.adapter)):
            correct += int((model(x).argmax(-1) == y).sum())
            total += len(y)
    assert correct / total == pytest.approx(cfg["card"]["metrics"]["test"]["acc1"], abs=1.01 / total)
