"""MLflow I/O: experiment set-up, the UI conventions (grid runs, views, links), artifact reading, the reaper of
ghost runs and the MLflow server. The analysis of results lives in :mod:`qlib_ext.analysis`."""
