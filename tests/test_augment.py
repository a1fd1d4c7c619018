"""Waveform augmentation for speech (uniperception.datasets.augment)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from uniperception.datasets.augment import SpeechAugment, build_transform
from uniperception.errors import InvalidInputError
from uniperception.training import build_dataset


def _tone(freq: float, n: int = 16000, sr: int = 16000) -> torch.Tensor:
    t = torch.arange(n) / sr
    return (0.3 * torch.sin(2 * torch.pi * freq * t))[None]


def _peak_hz(x: torch.Tensor, sr: int = 16000) -> float:
    spec = np.abs(np.fft.rfft(x[0].numpy()))
    return float(np.fft.rfftfreq(x.shape[-1], 1 / sr)[spec.argmax()])


def test_shape_dtype_and_seeded_determinism() -> None:
    a = SpeechAugment()
    x = torch.randn(1, 16000) * 0.1
    torch.manual_seed(0)
    y1 = a(x)
    torch.manual_seed(0)
    y2 = a(x)
    assert y1.shape == x.shape and y1.dtype == torch.float32 and torch.equal(y1, y2)
    assert y1.abs().max() <= 0.999 and torch.isfinite(y1).all()


def test_speed_moves_the_pitch_and_keeps_the_length() -> None:
    x = _tone(1000.0)
    fast = SpeechAugment(speed_range=(1.1, 1.1), eq_prob=0, lowpass_prob=0, highpass_prob=0, gain_db=0)(x)
    slow = SpeechAugment(speed_range=(0.9, 0.9), eq_prob=0, lowpass_prob=0, highpass_prob=0, gain_db=0)(x)
    assert fast.shape == slow.shape == x.shape
    assert _peak_hz(fast) == pytest.approx(1100, abs=5) and _peak_hz(slow) == pytest.approx(900, abs=5)


def test_lowpass_attenuates_above_the_cut_off() -> None:
    a = SpeechAugment(speed_range=(1, 1), eq_prob=0, lowpass_prob=1, lowpass_hz=(3000, 3000), highpass_prob=0,
                      gain_db=0)  # fmt: skip
    low, high = a(_tone(500.0)), a(_tone(6000.0))  # one octave above 3 kHz: -24 dB
    assert low.abs().max() == pytest.approx(0.3, rel=0.02)
    assert high.abs().max() == pytest.approx(0.3 * 10 ** (-24 / 20), rel=0.05)


def test_bad_settings_and_inputs_are_clear_errors() -> None:
    with pytest.raises(InvalidInputError):
        SpeechAugment(speed_range=(0.1, 3.0))
    with pytest.raises(InvalidInputError):
        SpeechAugment(eq_prob=2.0)
    with pytest.raises(InvalidInputError):
        SpeechAugment()(torch.zeros(16000))
    with pytest.raises(InvalidInputError):
        build_transform("reverb")
    with pytest.raises(InvalidInputError):
        build_transform({"kind": "speech", "nope": 1})
    assert build_transform(None) is None
    assert build_transform({"kind": "speech", "speed_range": [0.9, 1.1]}).speed_range == (0.9, 1.1)


def test_recipe_augment_key_becomes_the_dataset_transform(monkeypatch: pytest.MonkeyPatch) -> None:
    import uniperception.training.recipes as recipes

    seen = {}

    class Fake:
        def __init__(self, **kw: object) -> None:
            seen.update(kw)

    monkeypatch.setattr(recipes, "_datasets", lambda: {"fake": Fake})
    build_dataset({"dataset": "fake", "train": {"augment": "speech"}}, "train")
    assert isinstance(seen["transform"], SpeechAugment) and "augment" not in seen
    seen.clear()
    build_dataset({"dataset": "fake", "train": {"augment": "speech"}}, "test")
    assert "transform" not in seen
