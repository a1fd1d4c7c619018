"""Time-series forecasting with a large-kernel backbone: ``Forecaster(horizon=...).fit(df).predict()``.

The series adapter cuts lookback windows, instance-normalises them and folds each variable by its period
into an image; a UniRepLKNet reads the image and a forecasting head (plus a linear skip over the window)
predicts the next ``horizon`` steps, which are mapped back to the series' units. Training uses the one
training loop (:class:`~uniperception.training.Trainer`) on every window of the series, the most recent
``val_fraction`` of windows held out for validation. ``backtest`` scores rolling origins against a
seasonal-naive forecast and a ridge regression on lags, with MAE, MSE and MASE.
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch.utils.data import TensorDataset

from .adapters import build_adapter
from .adapters.series import estimate_period
from .errors import InvalidInputError
from .perceiver import Perceiver

__all__ = ["Forecaster", "forecast_scores"]

logger = logging.getLogger(__name__)

#: a small, fast backbone for short series (folded images are only a few pixels on a side)
DEFAULT_BACKBONE_KWARGS: dict[str, Any] = {"depths": (1, 1, 2, 1), "dims": (32, 64, 128, 256),
                                           "kernel_sizes": ((3,), (13,), (13, 13), (13,))}


def _frame(df: Any) -> pd.DataFrame:
    if isinstance(df, pd.Series):
        df = df.to_frame(df.name or "y")
    if not isinstance(df, pd.DataFrame):
        raise InvalidInputError(f"expected a pandas DataFrame or Series indexed by time, got {type(df).__name__}")
    if isinstance(df.index, pd.PeriodIndex):
        df = df.set_axis(df.index.to_timestamp())
    num = df.select_dtypes("number")
    if num.shape[1] == 0:
        raise InvalidInputError("the frame has no numeric columns to forecast")
    return num.astype("float64")


def forecast_scores(actual: np.ndarray, pred: np.ndarray, scale: float) -> dict[str, float]:
    """MAE, MSE and MASE (MAE over the in-sample seasonal-naive MAE ``scale``)."""
    err = pred - actual
    mae = float(np.abs(err).mean())
    return {"mae": mae, "mse": float((err**2).mean()), "mase": mae / scale if scale > 0 else float("nan")}


class Forecaster:
    """Fit/predict forecasting API (see the module docstring).

    Args:
        horizon: steps to forecast.
        lookback: steps of history each forecast sees.
        backbone / backbone_kwargs: the backbone (default: a small UniRepLKNet suited to short series).
        layout: series-to-image layout of the adapter (``"period"`` or ``"official"``).
        period: folding period (0 = estimated from the training series).
        epochs, batch_size, lr, seed: training settings; ``val_fraction`` of the latest windows validates.
    """

    def __init__(
        self,
        horizon: int,
        lookback: int = 48,
        backbone: str = "unireplknet_a",
        backbone_kwargs: dict[str, Any] | None = None,
        layout: str = "period",
        period: int = 0,
        epochs: int = 30,
        batch_size: int = 32,
        lr: float = 2e-3,
        seed: int = 0,
        val_fraction: float = 0.15,
        progress: bool = False,
    ) -> None:
        if horizon < 1 or lookback < 2:
            raise InvalidInputError("horizon must be >= 1 and lookback >= 2")
        self.horizon, self.lookback = int(horizon), int(lookback)
        self.backbone = backbone
        self.backbone_kwargs = dict(DEFAULT_BACKBONE_KWARGS if backbone_kwargs is None else backbone_kwargs)
        self.layout, self.period = layout, int(period)
        self.epochs, self.batch_size, self.lr, self.seed = epochs, batch_size, lr, seed
        self.val_fraction, self.progress = val_fraction, progress
        self.model: Perceiver | None = None
        self.history_: list[dict[str, Any]] = []
        self._data: pd.DataFrame | None = None

    # ------------------------------------------------------------------------------------------ fit
    def _windows(self, df: pd.DataFrame, adapter_cfg: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        t = len(df)
        need = self.lookback + self.horizon
        if t < need + 1:
            raise InvalidInputError(
                f"the series has {t} steps; fitting needs more than lookback + horizon = {need} steps"
            )
        sliding = build_adapter("series", **{**adapter_cfg, "hop": 1})
        x, stats = sliding.preprocess(df.iloc[: t - self.horizon], return_stats=True)
        values = torch.tensor(df.to_numpy(), dtype=torch.float32)
        starts = range(x.shape[0])
        y = torch.stack([values[s + self.lookback : s + self.lookback + self.horizon] for s in starts])
        y = (y - stats.mean) / stats.std
        return x, y

    def fit(self, df: Any) -> Forecaster:
        """Train on every window of ``df`` (DataFrame/Series indexed by time); returns ``self``."""
        from .training import TrainConfig, Trainer

        frame = _frame(df)
        period = self.period or (estimate_period(frame.to_numpy(), self.lookback // 2) if self.layout == "period" else 0)
        adapter_cfg = {"lookback": self.lookback, "num_variables": frame.shape[1], "layout": self.layout,
                       "period": int(period), "hop": 0}
        x, y = self._windows(frame, adapter_cfg)
        n_val = max(1, round(len(x) * self.val_fraction)) if len(x) > 4 else 0
        torch.manual_seed(self.seed)
        model = Perceiver("series", backbone=self.backbone, labels=[str(c) for c in frame.columns],
                          adapter=adapter_cfg, backbone_kwargs=self.backbone_kwargs, task="forecasting",
                          horizon=self.horizon)
        train = TensorDataset(x[: len(x) - n_val], y[: len(x) - n_val])
        val = TensorDataset(x[len(x) - n_val :], y[len(x) - n_val :]) if n_val else None
        with tempfile.TemporaryDirectory(prefix="uniperception-forecast-") as tmp:
            cfg = TrainConfig(epochs=self.epochs, batch_size=self.batch_size, lr=self.lr, weight_decay=0.01,
                              warmup_epochs=min(1.0, self.epochs / 10), seed=self.seed, out_dir=tmp,
                              progress=self.progress, save_every=10**9, keep_last=0)
            trainer = Trainer(model, train, val, cfg, collate_fn=_stack, val_collate_fn=_stack)
            self.history_ = trainer.fit()
        self.model = model.eval()
        self._data = frame
        self.period = int(period)
        return self

    def _require(self) -> Perceiver:
        if self.model is None:
            raise InvalidInputError("this Forecaster is not fitted: call fit(df) or Forecaster.from_pretrained(...)")
        return self.model

    # ------------------------------------------------------------------------------------------ predict
    def predict(self, df: Any = None, horizon: int | None = None) -> pd.DataFrame:
        """The ``horizon`` steps after the end of ``df`` (default: the data given to ``fit``)."""
        model = self._require()
        frame = self._data if df is None else _frame(df)
        if frame is None:
            raise InvalidInputError("no data: pass df (the history to forecast from)")
        return model.forecast(frame, horizon)

    def backtest(self, df: Any = None, windows: int = 5, refit: bool = True) -> pd.DataFrame:
        """Rolling-origin scores of the last ``windows`` origins: model vs seasonal naive vs ridge on lags.

        With ``refit`` (default) a fresh model with the same settings is trained on the data *before* the first
        origin, so no scored step was seen in training (as the ridge baseline, always fitted that way);
        ``refit=False`` scores the fitted model as is (optimistic if ``df`` overlaps its training data).
        """
        from sklearn.linear_model import Ridge

        frame = self._data if df is None else _frame(df)
        if frame is None:
            raise InvalidInputError("no data: pass df")
        values = frame.to_numpy()
        t, h, lb = len(values), self.horizon, self.lookback
        origins = [t - h - i * h for i in range(windows)][::-1]
        if origins[0] < lb + h:
            raise InvalidInputError(f"series too short for {windows} backtest windows of horizon {h}")
        if refit:
            clone = Forecaster(self.horizon, self.lookback, self.backbone, self.backbone_kwargs, self.layout,
                               self.period, self.epochs, self.batch_size, self.lr, self.seed, self.val_fraction)
            model = clone.fit(frame.iloc[: origins[0]]).model
        else:
            model = self._require()
        season = self.period if self.period > 1 else 1
        scale = float(np.abs(values[season : origins[0]] - values[: origins[0] - season]).mean()) or 1.0
        # ridge on lags: fitted on windows that end before the first origin
        xs = np.stack([values[s : s + lb].ravel() for s in range(0, origins[0] - lb - h + 1)])
        ys = np.stack([values[s + lb : s + lb + h].ravel() for s in range(0, origins[0] - lb - h + 1)])
        ridge = Ridge(alpha=1.0).fit(xs, ys)
        rows: dict[str, list[dict[str, float]]] = {"uniperception": [], "seasonal_naive": [], "ridge_lags": []}
        for o in origins:
            actual = values[o : o + h]
            pred = model.forecast(frame.iloc[:o], h).to_numpy()  # type: ignore[union-attr]
            naive = np.stack([values[o - season + (i % season)] for i in range(h)])
            ridge_pred = ridge.predict(values[o - lb : o].ravel()[None])[0].reshape(h, -1)
            rows["uniperception"].append(forecast_scores(actual, pred, scale))
            rows["seasonal_naive"].append(forecast_scores(actual, naive, scale))
            rows["ridge_lags"].append(forecast_scores(actual, ridge_pred, scale))
        return pd.DataFrame({k: pd.DataFrame(v).mean() for k, v in rows.items()}).T

    # ------------------------------------------------------------------------------------------ bundles
    def save_pretrained(self, directory: str | os.PathLike[str], card: dict[str, Any] | None = None) -> Path:
        """Write a forecasting bundle (loadable by ``Forecaster.from_pretrained`` and ``Perceiver.from_pretrained``)."""
        model = self._require()
        extra = {"forecaster": {"lookback": self.lookback, "horizon": self.horizon, "period": self.period,
                                "history": self.history_[-1:] if self.history_ else []}}
        d = model.save_pretrained(directory, card={**(card or {}), **extra})
        if self._data is not None:
            self._data.to_csv(Path(d) / "history.csv")  # the series predict() continues by default
        return Path(d)

    @classmethod
    def from_pretrained(cls, name_or_path: str | os.PathLike[str]) -> Forecaster:
        """Load a forecasting bundle."""
        model = Perceiver.from_pretrained(name_or_path)
        if model.task != "forecasting":
            raise InvalidInputError(f"{name_or_path} is a {model.task} bundle, not a forecasting one")
        cfg = model.adapter.config
        f = cls(horizon=model.horizon or 1, lookback=cfg.lookback, backbone=model.backbone_name,  # type: ignore[attr-defined]
                backbone_kwargs=model.backbone_kwargs, layout=cfg.layout, period=cfg.period)  # type: ignore[attr-defined]
        f.model = model
        hist = Path(name_or_path) / "history.csv"
        if hist.is_file():
            f._data = pd.read_csv(hist, index_col=0, parse_dates=True)
        return f


def _stack(samples: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    xs, ys = zip(*samples, strict=True)
    return torch.stack(xs), torch.stack(ys)
