"""Exceptions users can catch: one base class, a subclass per thing that can go wrong."""

from __future__ import annotations


class QlibExtError(Exception):
    """Base class of every error qlib-ext raises on purpose."""


class ConfigError(QlibExtError, ValueError):
    """A workflow YAML, a flag or a profile is invalid; the message names the file and key."""


class DataError(QlibExtError, ValueError):
    """Input data (CSV, a Qlib data directory) is unusable; the message names file and line."""


class StoreError(QlibExtError):
    """The task store (embedded store or MongoDB) cannot be reached or refused an operation."""


class TaskError(QlibExtError):
    """A task failed in a way the worker reports rather than retries."""
