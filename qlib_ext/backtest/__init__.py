"""Faster, report-for-report identical Qlib backtests (see :mod:`qlib_ext.backtest.fast`)."""
