"""The embedded MongoDB-wire-compatible task store: the queue works with no database to install.

Public API:

* :func:`serve` - run a store in the foreground (``qlib-ext store serve``).
* :func:`running_url` - URL of the live store in a directory, or None.
* :func:`resolve_mongo_url` - ``None``/``"embedded"`` -> the default store's URL (started in the
  background when needed); any other URL unchanged.
* :func:`stop` - SIGTERM the store of a directory and wait for it.
* :func:`open_store` - a store inside this process (tests, benchmarks).
* :func:`mask_url` - a URL (or any text) with its passwords replaced by ``***``, for logs.
"""

from __future__ import annotations

from qlib_ext.store.auth import mask as mask_url
from qlib_ext.store.lifecycle import open_store, resolve_mongo_url, running_url, serve, stop

__all__ = ["mask_url", "open_store", "resolve_mongo_url", "running_url", "serve", "stop"]
