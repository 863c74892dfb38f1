"""Analysis of a pool's results: statistics (Sharpe, PSR, Deflated Sharpe, PBO), sanity flags, the
leaderboard, plots, the grid summary and the HTML report. Reads MLflow through :mod:`qlib_ext.tracking`;
writes nothing a worker depends on."""
