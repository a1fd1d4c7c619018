"""Forecast a real series shipped with sktime (monthly airline passengers, 1949-1960).

    python examples/forecast_series.py [--epochs 30] [--csv FILE --column NAME]

Fits a Forecaster, prints the next 12 months and a backtest against seasonal-naive and ridge baselines.
"""

from __future__ import annotations

import argparse

import pandas as pd

from uniperception import Forecaster


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--csv", help="a CSV with a date column and numeric columns (ETT style)")
    ap.add_argument("--backtest-windows", type=int, default=2)
    args = ap.parse_args()
    if args.csv:
        from uniperception.datasets import load_ett_csv

        df = load_ett_csv(args.csv)
    else:
        from uniperception.datasets import load_series

        df = load_series("airline")
    f = Forecaster(horizon=12, lookback=36, epochs=args.epochs).fit(df)
    pd.set_option("display.precision", 1)
    print(f.predict())
    if args.backtest_windows:
        print(f.backtest(windows=args.backtest_windows))


if __name__ == "__main__":
    main()
