"""Real time series that ship inside Python packages, an ETT-style CSV loader and a sliding-window dataset.

* :func:`load_series` — forecasting series as a pandas ``DataFrame`` (``DatetimeIndex`` named ``date``, one column
  per variable) from statsmodels (``co2``, ``sunspots``, ``macrodata``, ``nile``) and sktime (``airline``,
  ``shampoo_sales``, ``lynx``, ``longley``, ``uschange``, ``solar``). Both are optional: imported lazily.
* :func:`load_classification` — sktime's bundled UCR/UEA classification sets as ``(X, y, classes)``.
* :func:`load_ett_csv` — ETT-style CSV files (``date`` column + variable columns), validated.
* :class:`WindowDataset` — ``(past [lookback, n_vars], future [horizon, n_vars])`` float32 windows.
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset

from ..errors import InvalidInputError, UnsupportedFormatError
from ._common import MissingDependencyError, check_positive_int

__all__ = [
    "CLASSIFICATION_DATASETS",
    "FORECASTING_SERIES",
    "SeriesClassification",
    "SeriesClassificationData",
    "WindowDataset",
    "load_classification",
    "load_ett_csv",
    "load_series",
]

logger = logging.getLogger(__name__)

_SKTIME_HINT = "pip install 'uniperception[data]' (sktime==1.2.0)"
_STATSMODELS_HINT = "pip install statsmodels==0.15.0"

#: Forecasting series and the package that ships each.
FORECASTING_SERIES: dict[str, str] = {
    "co2": "statsmodels",
    "sunspots": "statsmodels",
    "macrodata": "statsmodels",
    "nile": "statsmodels",
    "airline": "sktime",
    "shampoo_sales": "sktime",
    "lynx": "sktime",
    "longley": "sktime",
    "uschange": "sktime",
    "solar": "sktime",
}
#: UCR/UEA classification sets bundled with sktime, and their sktime loader.
CLASSIFICATION_DATASETS: dict[str, str] = {
    "GunPoint": "load_gunpoint",
    "ItalyPowerDemand": "load_italy_power_demand",
    "BasicMotions": "load_basic_motions",
    "JapaneseVowels": "load_japanese_vowels",
    "ArrowHead": "load_arrow_head",
    "OSULeaf": "load_osuleaf",
    "ACSF1": "load_acsf1",
    "PLAID": "load_plaid",
}

NAN_POLICIES = ("raise", "keep", "drop", "ffill", "interpolate")


def _import(module: str, hint: str) -> Any:
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise MissingDependencyError(f"{module} is needed for this dataset but not installed: {hint}") from e


def _to_timestamps(index: pd.Index) -> pd.DatetimeIndex:
    """Period/Datetime index → tz-naive ``DatetimeIndex`` (UTC for tz-aware input) named ``date``."""
    if isinstance(index, pd.PeriodIndex):
        out = index.to_timestamp()
    elif isinstance(index, pd.DatetimeIndex):
        out = index.tz_convert("UTC").tz_localize(None) if index.tz is not None else index
    else:  # pragma: no cover - every branch below builds a time index
        raise TypeError(f"not a time index: {type(index).__name__}")
    return pd.DatetimeIndex(out, name="date")


def _frame(data: pd.Series | pd.DataFrame, name: str | None = None) -> pd.DataFrame:
    df = data.to_frame(name or data.name) if isinstance(data, pd.Series) else data.copy()
    df.index = _to_timestamps(df.index)
    df.columns = [str(c) for c in df.columns]
    return df.astype(np.float64)


def _year_index(years: pd.Series) -> pd.DatetimeIndex:
    return pd.DatetimeIndex(pd.to_datetime(years.astype(int).astype(str), format="%Y"), name="date")


def _statsmodels_series(name: str) -> pd.DataFrame:
    sm_datasets = _import("statsmodels.datasets", _STATSMODELS_HINT)
    data = getattr(sm_datasets, name).load_pandas().data
    if name == "co2":
        df = data.copy()
        df.index = pd.DatetimeIndex(df.index, name="date")
        return df.astype(np.float64)
    if name == "sunspots":
        return pd.DataFrame({"sunactivity": data["SUNACTIVITY"].to_numpy()}, index=_year_index(data["YEAR"]))
    if name == "nile":
        return pd.DataFrame(
            {"volume": data["volume"].to_numpy(dtype=np.float64)}, index=_year_index(data["year"])
        )
    if name == "macrodata":
        idx = pd.PeriodIndex.from_fields(
            year=data["year"].astype(int), quarter=data["quarter"].astype(int), freq="Q"
        )
        df = data.drop(columns=["year", "quarter"]).set_axis(idx)
        return _frame(df)
    raise AssertionError(name)  # pragma: no cover


def _sktime_series(name: str) -> pd.DataFrame:
    ds = _import("sktime.datasets", _SKTIME_HINT)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if name == "airline":
            return _frame(ds.load_airline(), "passengers")
        if name == "shampoo_sales":
            return _frame(ds.load_shampoo_sales(), "sales")
        if name == "lynx":
            return _frame(ds.load_lynx(), "trappings")
        if name == "longley":
            y, x = ds.load_longley()
            return _frame(pd.concat([y, x], axis=1))
        if name == "uschange":
            y, x = ds.load_uschange()
            df = pd.concat([y, x], axis=1)
            # sktime drops the time axis: fpp2's uschange is quarterly from 1970 Q1.
            df.index = pd.period_range("1970Q1", periods=len(df), freq="Q")
            return _frame(df)
        if name == "solar":
            return _frame(ds.load_solar(api_version=None), "solar_gen")  # the stored copy: no network
    raise AssertionError(name)  # pragma: no cover


def load_series(name: str, nan_policy: str = "keep") -> pd.DataFrame:
    """A real forecasting series as a float64 ``DataFrame`` with a ``DatetimeIndex`` named ``date``.

    Names: see :data:`FORECASTING_SERIES`. Periods become their start timestamps (yearly → 1 January,
    quarterly → the quarter's first day); ``solar``'s UTC timestamps become tz-naive UTC. ``co2`` has gaps
    (NaN weeks); ``nan_policy`` (see :func:`load_ett_csv`) chooses what to do with them (default: keep).

    Raises:
        InvalidInputError: unknown name.
        MissingDependencyError: the shipping package (statsmodels / sktime) is not installed.
    """
    if name not in FORECASTING_SERIES:
        raise InvalidInputError(f"unknown series {name!r}; choose one of {', '.join(FORECASTING_SERIES)}")
    df = _statsmodels_series(name) if FORECASTING_SERIES[name] == "statsmodels" else _sktime_series(name)
    return _apply_nan_policy(df, nan_policy, name)


class SeriesClassificationData(NamedTuple):
    """A classification set: ``X`` float32 ``[n, channels, length]`` (or a list of ``[channels, length_i]``
    arrays when lengths differ), ``y`` int64 label indices, ``classes`` the label names (index order)."""

    X: np.ndarray | list[np.ndarray]
    y: np.ndarray
    classes: tuple[str, ...]


def _class_sort_key(label: str) -> tuple[int, float | str]:
    try:
        return (0, float(label))
    except ValueError:
        return (1, label)


def _nested_to_arrays(X: pd.DataFrame) -> list[np.ndarray]:
    """sktime's nested DataFrame (cells are Series) → list of float32 ``[channels, length_i]`` arrays."""
    return [
        np.stack([np.asarray(X.iat[i, j], dtype=np.float32) for j in range(X.shape[1])])
        for i in range(X.shape[0])
    ]


def load_classification(name: str, split: str | None = None) -> SeriesClassificationData:
    """A UCR/UEA classification set shipped with sktime (offline): ``(X, y, classes)``.

    Args:
        name: one of :data:`CLASSIFICATION_DATASETS` (``GunPoint``, ``ItalyPowerDemand``, ``BasicMotions``,
            ``JapaneseVowels`` and ``PLAID`` have unequal lengths/multiple channels as noted in the docs).
        split: ``"train"``, ``"test"`` or ``None`` (both, train first).

    Classes are the distinct labels sorted numerically when they are numbers, else alphabetically.
    """
    if name not in CLASSIFICATION_DATASETS:
        raise InvalidInputError(
            f"unknown dataset {name!r}; choose one of {', '.join(CLASSIFICATION_DATASETS)}"
        )
    if split not in (None, "train", "test"):
        raise InvalidInputError(f"split must be 'train', 'test' or None, got {split!r}")
    ds = _import("sktime.datasets", _SKTIME_HINT)
    loader = getattr(ds, CLASSIFICATION_DATASETS[name])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            X, y = loader(split=split, return_X_y=True, return_type="numpy3D")
            X = np.asarray(X, dtype=np.float32)
        except ValueError:  # unequal lengths: numpy3D is impossible
            Xn, y = loader(split=split, return_X_y=True, return_type="nested_univ")
            X = _nested_to_arrays(Xn)
            if len({x.shape for x in X}) == 1:
                X = np.stack(X)
    labels = np.asarray(y).astype(str)
    classes = tuple(sorted(set(labels.tolist()), key=_class_sort_key))
    lookup = {c: i for i, c in enumerate(classes)}
    return SeriesClassificationData(X, np.array([lookup[v] for v in labels], dtype=np.int64), classes)


class SeriesClassification(Dataset):
    """A bundled UCR/UEA set as a map-style dataset: ``(series float32 tensor [channels, length], label_index)``."""

    def __init__(
        self,
        name: str,
        split: str | None = "train",
        transform: Callable[[torch.Tensor], Any] | None = None,
        target_transform: Callable[[int], Any] | None = None,
    ) -> None:
        self.name = name
        self.X, y, self.classes = load_classification(name, split)
        self.targets = y.tolist()
        self.transform = transform
        self.target_transform = target_transform

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[Any, Any]:
        x: Any = torch.from_numpy(np.ascontiguousarray(self.X[index]))
        y: Any = self.targets[index]
        if self.transform is not None:
            x = self.transform(x)
        if self.target_transform is not None:
            y = self.target_transform(y)
        return x, y


# ------------------------------------------------------------------------------------------------------ ETT CSV


def _apply_nan_policy(df: pd.DataFrame, policy: str, what: str) -> pd.DataFrame:
    if policy not in NAN_POLICIES:
        raise InvalidInputError(f"nan_policy must be one of {NAN_POLICIES}, got {policy!r}")
    n_nan = int(df.isna().to_numpy().sum())
    if n_nan == 0 or policy == "keep":
        return df
    if policy == "raise":
        cols = [c for c in df.columns if df[c].isna().any()]
        first = df.index[df.isna().any(axis=1)][0]
        raise InvalidInputError(
            f"{what}: {n_nan} missing values (columns {cols}, first at {first}); pass nan_policy="
            "'interpolate', 'ffill', 'drop' or 'keep'"
        )
    if policy == "drop":
        return df.dropna()
    if policy == "ffill":
        return df.ffill().bfill()
    return (
        df.interpolate(method="time" if isinstance(df.index, pd.DatetimeIndex) else "linear").ffill().bfill()
    )


def load_ett_csv(
    path: str | os.PathLike[str],
    date_column: str = "date",
    columns: Sequence[str] | None = None,
    nan_policy: str = "raise",
) -> pd.DataFrame:
    """Read an ETT-style CSV (``date`` column + numeric variable columns) into a float64 ``DataFrame``.

    The result is indexed by the parsed timestamps (``DatetimeIndex`` named ``date``), one column per variable
    (ETTh1: ``HUFL HULL MUFL MULL LUFL LULL OT``).

    Args:
        path: the CSV file.
        date_column: the timestamp column.
        columns: keep only these variables (in this order); default every other column.
        nan_policy: missing values (empty cells, ``NaN``): ``"raise"`` (default), ``"keep"``, ``"drop"`` (rows),
            ``"ffill"`` (forward then backward fill) or ``"interpolate"`` (time-weighted linear, ends filled).

    Raises:
        InvalidInputError: missing/unparseable dates, timestamps not strictly increasing (out of order or
            duplicated), non-numeric values, unknown columns, or missing values under ``nan_policy="raise"``.
        UnsupportedFormatError: the file cannot be parsed as CSV.
    """
    try:
        raw = pd.read_csv(path)
    except FileNotFoundError as e:
        raise InvalidInputError(f"{path}: no such file") from e
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
        raise UnsupportedFormatError(f"{path}: cannot parse as CSV ({e})") from e
    if date_column not in raw.columns:
        raise InvalidInputError(f"{path}: no {date_column!r} column (columns: {list(raw.columns)})")
    try:
        dates = pd.to_datetime(raw[date_column], errors="raise")
    except (ValueError, TypeError) as e:
        raise InvalidInputError(f"{path}: cannot parse the {date_column!r} column as dates ({e})") from e
    if dates.isna().any():
        raise InvalidInputError(f"{path}: {int(dates.isna().sum())} empty timestamps in {date_column!r}")
    index = pd.DatetimeIndex(dates, name="date")
    dup = index.duplicated()
    if dup.any():
        raise InvalidInputError(
            f"{path}: duplicate timestamps, first {index[dup][0]} (row {int(np.argmax(dup)) + 2})"
        )
    if not index.is_monotonic_increasing:
        bad = int(np.argmax(np.diff(index.asi8) < 0)) + 1
        raise InvalidInputError(
            f"{path}: timestamps are not sorted: {index[bad]} (row {bad + 2}) comes after {index[bad - 1]}; "
            "sort the file by date first"
        )
    values = raw.drop(columns=[date_column])
    if columns is not None:
        missing = [c for c in columns if c not in values.columns]
        if missing:
            raise InvalidInputError(f"{path}: columns {missing} not found (have {list(values.columns)})")
        values = values[list(columns)]
    if values.shape[1] == 0:
        raise InvalidInputError(f"{path}: no variable columns besides {date_column!r}")
    numeric = values.apply(pd.to_numeric, errors="coerce")
    bad_cells = numeric.isna() & values.notna()
    if bad_cells.to_numpy().any():
        col = bad_cells.any().idxmax()
        row = int(np.argmax(bad_cells[col].to_numpy()))
        raise InvalidInputError(
            f"{path}: non-numeric value {values[col].iloc[row]!r} in column {col!r} (row {row + 2})"
        )
    df = numeric.astype(np.float64).set_axis(index)
    return _apply_nan_policy(df, nan_policy, str(path))


# ------------------------------------------------------------------------------------------------------ windows


class WindowDataset(Dataset):
    """Sliding windows over a multivariate series: ``(past [lookback, n_vars], future [horizon, n_vars])``.

    Window ``i`` starts at row ``i * stride``; there are ``(len - lookback - horizon) // stride + 1`` windows.
    Both tensors are float32. ``transform``, if given, is applied to the ``(past, future)`` pair.

    Args:
        data: a ``DataFrame`` / ``Series`` (numeric columns; the index is ignored) or an array ``[time, n_vars]``
            (or ``[time]``).
        lookback, horizon, stride: window geometry (positive integers).
        columns: for a ``DataFrame``, the variables to use (in order).

    Raises:
        InvalidInputError: the series is shorter than ``lookback + horizon``, contains NaN/Inf, or is not 1-/2-D.
    """

    def __init__(
        self,
        data: pd.DataFrame | pd.Series | np.ndarray,
        lookback: int,
        horizon: int,
        stride: int = 1,
        columns: Sequence[str] | None = None,
        transform: Callable[[tuple[torch.Tensor, torch.Tensor]], Any] | None = None,
    ) -> None:
        self.lookback = check_positive_int(lookback, "lookback")
        self.horizon = check_positive_int(horizon, "horizon")
        self.stride = check_positive_int(stride, "stride")
        if isinstance(data, pd.Series):
            data = data.to_frame()
        if isinstance(data, pd.DataFrame):
            if columns is not None:
                data = data[list(columns)]
            self.columns: tuple[str, ...] = tuple(str(c) for c in data.columns)
            try:
                arr = data.to_numpy(dtype=np.float32)
            except (TypeError, ValueError) as e:
                raise InvalidInputError(f"series has non-numeric columns ({e})") from e
        else:
            arr = np.asarray(data, dtype=np.float32)
            if arr.ndim == 1:
                arr = arr[:, None]
            self.columns = tuple(str(i) for i in range(arr.shape[1])) if arr.ndim == 2 else ()
        if arr.ndim != 2:
            raise InvalidInputError(f"series must be [time, n_vars], got shape {arr.shape}")
        if not np.isfinite(arr).all():
            raise InvalidInputError(
                "series contains NaN/Inf: clean it first (e.g. load_ett_csv(nan_policy=...))"
            )
        need = self.lookback + self.horizon
        if len(arr) < need:
            raise InvalidInputError(
                f"series has {len(arr)} time steps, shorter than lookback + horizon = {self.lookback} + "
                f"{self.horizon} = {need}: no window fits"
            )
        self.data = torch.from_numpy(np.array(arr, dtype=np.float32, order="C", copy=True))
        self.transform = transform

    def __len__(self) -> int:
        return (len(self.data) - self.lookback - self.horizon) // self.stride + 1

    def __getitem__(self, index: int) -> Any:
        if not -len(self) <= index < len(self):
            raise IndexError(f"window {index} out of range for {len(self)} windows")
        start = (index % len(self)) * self.stride
        past = self.data[start : start + self.lookback]
        future = self.data[start + self.lookback : start + self.lookback + self.horizon]
        pair = (past, future)
        return self.transform(pair) if self.transform is not None else pair

    def __repr__(self) -> str:
        return (
            f"WindowDataset(n={len(self)}, lookback={self.lookback}, horizon={self.horizon}, stride={self.stride}, "
            f"n_vars={self.data.shape[1]})"
        )
