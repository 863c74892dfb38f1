"""qlib-ext: grids of Qlib research tasks on Qlib's TaskManager, many worker processes, MLflow results."""

__version__ = "0.1.0"
