"""Forecaster: fit/predict/backtest, bundles through Perceiver.forecast, clear errors."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from uniperception import Forecaster, Perceiver
from uniperception.errors import InvalidInputError, ModalityMismatchError

TINY = {"depths": (1, 1, 1, 1), "dims": (8, 16, 32, 64), "kernel_sizes": ((3,), (7,), (3,), (3,))}


def _series(n: int = 240, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    t = np.arange(n)
    y = 10 + 3 * np.sin(2 * np.pi * t / 12) + 0.02 * t + rng.normal(0, 0.3, n)
    z = 5 + np.cos(2 * np.pi * t / 12) + rng.normal(0, 0.2, n)
    return pd.DataFrame({"y": y, "z": z}, index=pd.date_range("2020-01-01", periods=n, freq="D"))


@pytest.fixture(scope="module")
def fitted() -> Forecaster:
    return Forecaster(horizon=6, lookback=36, backbone_kwargs=TINY, epochs=12, lr=3e-3).fit(_series())


def test_predict_future_index_and_quality(fitted):
    df = _series()
    pred = fitted.predict()
    assert list(pred.columns) == ["y", "z"] and len(pred) == 6
    assert pred.index[0] == df.index[-1] + pd.Timedelta(days=1) and pred.index.freqstr == "D"
    truth = _series(246).iloc[-6:]  # same noise-free pattern continues
    assert np.abs(pred.to_numpy() - truth.to_numpy()).mean() < 1.0  # the signal has amplitude 3
    assert len(fitted.predict(df.iloc[:200], horizon=3)) == 3


def test_backtest_against_baselines(fitted):
    scores = fitted.backtest(windows=2, refit=False)
    assert list(scores.index) == ["uniperception", "seasonal_naive", "ridge_lags"]
    assert set(scores.columns) == {"mae", "mse", "mase"} and (scores.to_numpy() >= 0).all()


def test_bundle_round_trip_and_perceiver_forecast(fitted, tmp_path):
    d = fitted.save_pretrained(tmp_path / "fc")
    again = Forecaster.from_pretrained(d)
    pd.testing.assert_frame_equal(again.predict(), fitted.predict())
    p = Perceiver.from_pretrained(d)
    df = _series()
    out = p.forecast(df)
    pd.testing.assert_frame_equal(out, fitted.predict(df))
    assert len(p.forecast(df, horizon=2)) == 2  # shorter horizons truncate
    with pytest.raises(InvalidInputError, match="trained horizon"):
        p.forecast(df, horizon=7)
    with pytest.raises(InvalidInputError, match="forecasting model"):
        p.classify_series(df)


def test_errors():
    f = Forecaster(horizon=6, lookback=36, backbone_kwargs=TINY, epochs=1)
    with pytest.raises(InvalidInputError, match="not fitted"):
        f.predict(_series())
    with pytest.raises(InvalidInputError, match="steps"):
        f.fit(_series(40))
    bad = _series()
    bad.iloc[5, 0] = np.nan
    with pytest.raises(InvalidInputError, match="NaN"):
        f.fit(bad)
    with pytest.raises(InvalidInputError, match="increasing"):
        f.fit(_series().iloc[::-1])
    with pytest.raises(InvalidInputError):
        f.fit(np.zeros((100, 2)))
    img = Perceiver("image", labels=["a"], adapter={"size": 32}, backbone_kwargs=TINY)
    with pytest.raises(ModalityMismatchError):
        img.forecast(_series())
