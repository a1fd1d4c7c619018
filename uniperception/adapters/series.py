"""Time-series adapter: DataFrame / Series / ``T×N`` array → normalised windows → images.

Processor (no weights): validate (numeric, finite, strictly increasing timestamps), cut the ``lookback``
window(s) — the most recent one for forecasting, or all windows ``hop`` apart for classification of long
series — instance-normalise each window per variable (Corrformer/RevIN: subtract the mean, divide by
``sqrt(biased var + eps)``; the statistics come back with ``return_stats=True`` so a forecast can be mapped
back with :func:`denormalize`), and append four calendar features (hour of day, day of week, day of month,
day of year, each in [−0.5, 0.5], Informer's ``timeF``) when the input has timestamps (zeros otherwise).
Output ``[pieces, lookback, num_variables + 4]`` (``+ 0`` with ``calendar=False``).

Embedding (``layout``):

* ``"official"`` (default — chosen by measurement, see ``docs/adapters.md``): Corrformer's embedding — circular
  ``Conv1d(N → d_model, k=3, no bias)`` on the values plus ``Linear(4 → d_model, no bias)`` on the calendar
  features, dropout — then the raw reshape of the ``lookback × d_model`` matrix into one ``1 × S × S`` image,
  ``S² = lookback · d_model`` (official 48 · 768 = 192²). Each image row holds ``S / d_model`` consecutive time
  steps' embeddings side by side, so vertical neighbours are time steps ``S / d_model`` apart and horizontal ones
  mix embedding channels: a layout hack that needs ``lookback · d_model`` to be a perfect square
  (``d_model=0`` picks the smallest ``d_model ≥ 16`` that makes one).
* ``"period"``: each channel (variables, then calendar features) folded by the period ``P`` into a
  ``P × cycles`` image (row = phase in the cycle, column = cycle; the most recent value is the bottom-right pixel,
  the oldest cycle zero-padded at the front), no learnable weights. A 2-D kernel sees neighbouring time steps
  vertically and the same phase of neighbouring cycles horizontally (TimesNet's idea). ``period=0`` estimates
  ``P`` per batch from the mean FFT amplitude; set it (e.g. with :func:`estimate_period` on the training series)
  for batch-independent results.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import InvalidInputError, UnsupportedFormatError
from .base import AdapterConfig, ModalityAdapter, register_adapter

__all__ = [
    "SERIES_LAYOUTS",
    "SeriesAdapter",
    "SeriesConfig",
    "SeriesStats",
    "calendar_features",
    "denormalize",
    "estimate_period",
    "fold_by_period",
    "normalize",
    "square_widths",
]

logger = logging.getLogger(__name__)

SERIES_LAYOUTS = ("period", "official")
NUM_CALENDAR = 4
_TIME_COLUMNS = ("date", "datetime", "time", "timestamp")


@dataclasses.dataclass
class SeriesConfig(AdapterConfig):
    """Windowing, normalisation and layout of the series adapter (saved in bundles).

    Arrays are ``T × N`` (time on axis 0, variables on axis 1, as a DataFrame). ``hop=0`` keeps only the most
    recent window (forecasting); ``hop > 0`` cuts all windows ``hop`` steps apart, the last one ending at the
    last step (classification of long series; the caller pools the scores). ``d_model=0`` (official layout) picks
    the smallest width ≥ 16 making ``lookback · d_model`` a square (24 for the default lookback 96 → 48 × 48).
    """

    lookback: int = 96
    num_variables: int = 1
    layout: str = "official"
    normalize: bool = True
    eps: float = 1e-5
    calendar: bool = True
    hop: int = 0
    period: int = 0
    d_model: int = 0
    dropout: float = 0.05

    @classmethod
    def official(cls, num_variables: int = 11) -> SeriesConfig:
        """Corrformer's Global Temperature/Wind setting: 48 h lookback, d_model 768 → 192 × 192 images."""
        return cls(lookback=48, num_variables=num_variables, layout="official", d_model=768)


class SeriesStats(NamedTuple):
    """Per-window, per-variable statistics of the instance normalisation (``[..., 1, N]`` each)."""

    mean: Tensor
    std: Tensor


# --------------------------------------------------------------------------------------------- helpers


def normalize(x: Tensor, eps: float = 1e-5) -> tuple[Tensor, SeriesStats]:
    """Instance-normalise ``[..., T, N]`` over time per variable → (normalised, stats)."""
    mean = x.mean(dim=-2, keepdim=True)
    std = torch.sqrt(x.var(dim=-2, keepdim=True, unbiased=False) + eps)
    return (x - mean) / std, SeriesStats(mean, std)


def denormalize(pred: Tensor, stats: SeriesStats) -> Tensor:
    """Map normalised values ``[..., H, N]`` (e.g. a forecast) back to the units of the window's series."""
    mean, std = stats
    return pred * std.to(pred) + mean.to(pred)


def calendar_features(index: pd.DatetimeIndex) -> np.ndarray:
    """Informer's ``timeF`` features of an hourly index: hour/23, weekday/6, (day−1)/30, (yday−1)/365, minus 0.5."""
    return np.stack(
        [
            index.hour / 23.0 - 0.5,
            index.dayofweek / 6.0 - 0.5,
            (index.day - 1) / 30.0 - 0.5,
            (index.dayofyear - 1) / 365.0 - 0.5,
        ],
        axis=1,
    ).astype(np.float32)


def estimate_period(x: Any, max_period: int | None = None) -> int:
    """Dominant period (in steps) of ``x`` (``T``, ``T×N`` array/DataFrame, or ``[B, T, N]``).

    Removes each variable's linear trend, takes the arg-max ``k ≥ 1`` of the mean FFT amplitude and returns
    ``round(T / k)`` clamped to ``[2, max_period]`` (default ``T // 2``: at least two cycles).
    """
    if isinstance(x, (pd.DataFrame, pd.Series)):
        x = x.to_numpy(dtype=np.float64)
    t = (
        x.detach().double().cpu()
        if isinstance(x, Tensor)
        else torch.from_numpy(np.array(x, dtype=np.float64))
    )
    if t.dim() == 1:
        t = t.view(1, -1, 1)
    elif t.dim() == 2:
        t = t.unsqueeze(0)
    n = t.shape[1]
    if n < 4:
        return max(1, n)
    ramp = torch.linspace(-1, 1, n, dtype=t.dtype).view(1, n, 1)
    t = t - t.mean(dim=1, keepdim=True)
    t = t - ramp * (t * ramp).sum(dim=1, keepdim=True) / ramp.square().sum()
    amp = torch.fft.rfft(t, dim=1).abs().mean(dim=(0, 2))
    amp[0] = 0
    k = int(amp.argmax())
    period = round(n / max(k, 1))
    return int(min(max(period, 2), max_period or max(2, n // 2)))


def fold_by_period(x: Tensor, period: int) -> Tensor:
    """``[B, T, C]`` → ``[B, C, period, cycles]``: column ``j`` is cycle ``j``, row ``i`` its phase ``i``; the front
    is zero-padded so the last step lands in the bottom-right pixel."""
    b, t, c = x.shape
    cycles = math.ceil(t / period)
    pad = cycles * period - t
    x = F.pad(x, (0, 0, pad, 0))
    return x.view(b, cycles, period, c).permute(0, 3, 2, 1).contiguous()


def square_widths(lookback: int, limit: int = 64) -> list[int]:
    """The first ``limit`` widths ``d`` for which ``lookback · d`` is a perfect square (``lookback`` times ``k²``
    over the square-free part)."""
    free = lookback
    for f in range(2, math.isqrt(lookback) + 1):
        while free % (f * f) == 0:
            free //= f * f
    return [free * k * k for k in range(1, limit + 1)]


def _frame_from_path(path: Path) -> pd.DataFrame:
    if not path.is_file():
        raise InvalidInputError(f"series file not found: {path}")
    if path.suffix.lower() not in (".csv", ".txt", ".tsv"):
        raise UnsupportedFormatError(f"unsupported series file {path.suffix!r}; pass a CSV or a DataFrame")
    try:
        return pd.read_csv(path, sep="\t" if path.suffix.lower() == ".tsv" else ",")
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
        raise UnsupportedFormatError(f"cannot read series CSV {path}: {e}") from e
    except Exception as e:  # the C parser has more ways to fail on corrupt bytes (ValueError, OverflowError…)
        raise UnsupportedFormatError(f"cannot read series CSV {path}: {type(e).__name__}: {e}") from e


def _to_values(x: Any, timestamps: Any = None) -> tuple[np.ndarray, pd.DatetimeIndex | None]:
    """Any accepted input → (float64 ``T×N`` values, timestamps or None)."""
    if isinstance(x, (str, os.PathLike)):
        x = _frame_from_path(Path(x))
    if isinstance(x, pd.Series):
        x = x.to_frame()
    index = None
    if isinstance(x, pd.DataFrame):
        df = x
        if isinstance(df.index, pd.PeriodIndex):
            index = df.index.to_timestamp()
        elif isinstance(df.index, pd.DatetimeIndex):
            index = df.index
        else:
            cols = [c for c in df.columns if pd.api.types.is_datetime64_any_dtype(df[c])]
            cols += [c for c in df.columns if str(c).lower() in _TIME_COLUMNS and c not in cols]
            if cols:
                try:
                    index = pd.DatetimeIndex(pd.to_datetime(df[cols[0]]))
                except (ValueError, TypeError) as e:
                    raise InvalidInputError(f"cannot parse the time column {cols[0]!r}: {e}") from e
                df = df.drop(columns=[cols[0]])
        bad = [
            c
            for c in df.columns
            if not pd.api.types.is_numeric_dtype(df[c]) or pd.api.types.is_bool_dtype(df[c])
        ]
        if bad:
            raise InvalidInputError(f"non-numeric column(s) {bad}; drop them or convert them to numbers")
        values = df.to_numpy(dtype=np.float64, na_value=np.nan)
    elif isinstance(x, (np.ndarray, Tensor, list, tuple)):
        if isinstance(x, Tensor):
            t = x.detach().cpu()
            arr = (t.double() if t.dtype in (torch.bfloat16, torch.float16) else t).numpy()
        else:
            try:
                arr = np.asarray(x)
            except (TypeError, ValueError) as e:
                raise InvalidInputError(f"cannot read a series from a {type(x).__name__}: {e}") from e
        if arr.dtype == object or not (np.issubdtype(arr.dtype, np.number)) or np.iscomplexobj(arr):
            raise InvalidInputError(f"series arrays must hold real numbers, got dtype {arr.dtype}")
        values = arr.astype(np.float64)
        if values.ndim == 1:
            values = values[:, None]
        if values.ndim != 2:
            raise InvalidInputError(f"a series array must be T (1-D) or T×N (2-D), got shape {arr.shape}")
    else:
        raise InvalidInputError(
            f"cannot read a series from {type(x).__name__}; pass a DataFrame, Series, CSV path or T×N array"
        )
    if timestamps is not None:
        try:
            index = pd.DatetimeIndex(pd.to_datetime(timestamps))
        except (ValueError, TypeError) as e:
            raise InvalidInputError(f"cannot parse timestamps: {e}") from e
        if len(index) != len(values):
            raise InvalidInputError(f"{len(index)} timestamps for {len(values)} time steps")
    return values, index


# --------------------------------------------------------------------------------------------- adapter


@register_adapter
class SeriesAdapter(ModalityAdapter):
    """Series → ``[pieces, lookback, N (+4)]`` normalised windows → ``period`` or ``official`` images."""

    modality = "series"
    config_class = SeriesConfig

    def __init__(self, config: SeriesConfig | None = None) -> None:
        super().__init__(config or SeriesConfig())
        cfg: SeriesConfig = self.config  # type: ignore[assignment]
        if cfg.layout not in SERIES_LAYOUTS:
            raise InvalidInputError(f"unknown series layout {cfg.layout!r}; choose from {SERIES_LAYOUTS}")
        if cfg.lookback < 2 or cfg.num_variables < 1 or cfg.hop < 0 or cfg.period < 0:
            raise InvalidInputError("SeriesConfig: lookback ≥ 2, num_variables ≥ 1, hop ≥ 0, period ≥ 0")
        self.value_embedding: nn.Module | None = None
        self.time_embedding: nn.Module | None = None
        if cfg.layout == "official":
            d_model = self.d_model
            if math.isqrt(cfg.lookback * d_model) ** 2 != cfg.lookback * d_model:
                raise InvalidInputError(
                    f"the official layout reshapes lookback × d_model into a square; {cfg.lookback} × {d_model} "
                    f"is not one (d_model values that work for this lookback: {square_widths(cfg.lookback)[:6]}; "
                    "or pass d_model=0 to pick one)"
                )
            conv = nn.Conv1d(cfg.num_variables, d_model, 3, padding=1, padding_mode="circular", bias=False)
            nn.init.kaiming_normal_(conv.weight, mode="fan_in", nonlinearity="leaky_relu")
            self.value_embedding = conv
            if cfg.calendar:
                self.time_embedding = nn.Linear(NUM_CALENDAR, d_model, bias=False)
            self.dropout = nn.Dropout(cfg.dropout)

    @property
    def out_channels(self) -> int:
        cfg: SeriesConfig = self.config  # type: ignore[assignment]
        if cfg.layout == "official":
            return 1
        return cfg.num_variables + (NUM_CALENDAR if cfg.calendar else 0)

    @property
    def d_model(self) -> int:
        """Embedding width of the official layout (``config.d_model``, or the automatic choice when it is 0)."""
        cfg: SeriesConfig = self.config  # type: ignore[assignment]
        return cfg.d_model or next(d for d in square_widths(cfg.lookback) if d >= 16)

    @property
    def in_features(self) -> int:
        """Columns of a processed window: variables, then calendar features."""
        cfg: SeriesConfig = self.config  # type: ignore[assignment]
        return cfg.num_variables + (NUM_CALENDAR if cfg.calendar else 0)

    # --- processor ------------------------------------------------------------------------------------

    def window_starts(self, length: int) -> list[int]:
        """Start steps of the windows cut from a series of ``length`` steps (oldest first)."""
        cfg: SeriesConfig = self.config  # type: ignore[assignment]
        last = length - cfg.lookback
        if cfg.hop <= 0:
            return [last]
        return list(range(last % cfg.hop, last + 1, cfg.hop))

    def preprocess(
        self,
        x: Any,
        *,
        train: bool = False,
        timestamps: Any = None,
        return_stats: bool = False,
        **kwargs: Any,
    ) -> Any:
        """One series → ``[windows, lookback, num_variables (+4)]``; with ``return_stats`` also :class:`SeriesStats`.

        ``x``: a DataFrame (DatetimeIndex/PeriodIndex, or a ``date`` column; one numeric column per variable),
        a Series, a CSV path, or a ``T×N`` array/tensor (``timestamps=`` optional). ``train`` changes nothing
        (no augmentation for series).
        """
        if kwargs:
            raise InvalidInputError(f"unexpected keyword argument(s) for series preprocess: {sorted(kwargs)}")
        cfg: SeriesConfig = self.config  # type: ignore[assignment]
        values, index = _to_values(x, timestamps)
        t, n = values.shape
        if n != cfg.num_variables:
            hint = " (it looks like N×T: transpose it)" if t == cfg.num_variables else ""
            raise InvalidInputError(
                f"this adapter expects {cfg.num_variables} variable(s) (columns), got shape {values.shape}{hint}"
            )
        if t == 0:
            raise InvalidInputError("empty series (zero time steps)")
        if not np.isfinite(values).all():
            raise InvalidInputError(
                "the series contains NaN or Inf values; fill them first (e.g. df.interpolate().bfill())"
            )
        if t < cfg.lookback:
            raise InvalidInputError(
                f"the series has {t} steps, fewer than the lookback window of {cfg.lookback}; pass a longer "
                "history or build the adapter with a smaller lookback"
            )
        if index is not None:
            if index.hasnans:
                raise InvalidInputError("timestamps contain missing values (NaT)")
            if not index.is_unique:
                raise InvalidInputError(
                    "duplicate timestamps; aggregate them first (e.g. df.groupby(level=0).mean())"
                )
            if not index.is_monotonic_increasing:
                raise InvalidInputError(
                    "timestamps are not increasing; sort the series first (df.sort_index())"
                )
        starts = self.window_starts(t)
        win = torch.from_numpy(np.stack([values[s : s + cfg.lookback] for s in starts])).float()
        if cfg.normalize:
            win, stats = normalize(win, cfg.eps)
        else:
            stats = SeriesStats(torch.zeros(len(starts), 1, n), torch.ones(len(starts), 1, n))
        if cfg.calendar:
            if index is not None:
                cal_all = calendar_features(index)
                cal = torch.from_numpy(np.stack([cal_all[s : s + cfg.lookback] for s in starts]))
            else:
                cal = torch.zeros(len(starts), cfg.lookback, NUM_CALENDAR)
            win = torch.cat([win, cal], dim=-1)
        win = win.contiguous()
        if not all(torch.isfinite(t).all() for t in (win, *stats)):  # values beyond float32's range
            raise InvalidInputError(
                "the series' values are too large to normalise in float32 (|x| up to "
                f"{np.abs(values).max():.3g}); rescale the series"
            )
        return (win, stats) if return_stats else win

    # --- embedding ------------------------------------------------------------------------------------

    def forward(self, batch: Tensor) -> Tensor:
        """``[B, lookback, N (+4)]`` → ``[B, C', H, W]`` in the configured layout."""
        cfg: SeriesConfig = self.config  # type: ignore[assignment]
        if batch.dim() != 3 or batch.shape[1] != cfg.lookback or batch.shape[2] != self.in_features:
            raise InvalidInputError(
                f"series batch must be B×{cfg.lookback}×{self.in_features} (stack preprocess outputs), "
                f"got {tuple(batch.shape)}"
            )
        if cfg.layout == "period":
            period = cfg.period or estimate_period(
                batch[..., : cfg.num_variables].detach(), cfg.lookback // 2
            )
            return fold_by_period(batch, min(period, cfg.lookback))
        assert self.value_embedding is not None
        vals = batch[..., : cfg.num_variables]
        emb = self.value_embedding(vals.transpose(1, 2)).transpose(1, 2)  # B×L×d
        if self.time_embedding is not None:
            emb = emb + self.time_embedding(batch[..., cfg.num_variables :])
        emb = self.dropout(emb)
        side = math.isqrt(cfg.lookback * self.d_model)
        return emb.reshape(batch.shape[0], 1, side, side)
