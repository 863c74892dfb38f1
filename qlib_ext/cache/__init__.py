"""The shared cache: prepared datasets, backtest exchanges, LightGBM's binned data, and the entry format."""
