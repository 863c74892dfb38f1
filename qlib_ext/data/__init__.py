"""Qlib-format datasets: a synthetic market with planted alpha, CSV import, and a summary report."""
