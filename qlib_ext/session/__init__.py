"""A run session: the library behind ``qlib-ext run``/``submit``/``worker`` and ``qlib_ext.run``.

- :mod:`~qlib_ext.session.options`: the run's options, defined once (CLI flags and API keywords).
- :mod:`~qlib_ext.session.plan`: the workflow loaded once, the pool metadata in memory, the submit.
- :mod:`~qlib_ext.session.run`: submit -> search proposer -> cache warm-up -> workers -> summary.
- :mod:`~qlib_ext.session.result`: what ``qlib_ext.run`` returns.

Importing the package is light (no qlib, mlflow, pandas): heavy modules load when a step runs.
"""
