"""Which code a task definition may name: a worker-side allow-list of module prefixes.

A plain-dict task is still code: Qlib's ``init_instance_by_config`` imports whatever a ``class``
(``"a.b.Class"``), ``func`` or ``module_path`` names — a module path may even be a ``.py`` file — and
unpickles a ``"file://...pkl"`` reference. Before a worker (or the cache warmer) imports anything
for a task, :func:`check_modules` walks its definition and refuses every such reference whose module
does not fall under one of the allowed prefixes. ``file://`` references (any string Qlib's URL parsing
takes for one) are refused unless ``file://`` itself is on the list. Names are normalised before they
are compared: a module name must be a dotted Python name, and a ``.py`` path is resolved and allowed only
inside a listed prefix that is a directory.

A class named without a module (``class: SignalRecord``) is resolved by qlib-ext or Qlib in a
default module of their choosing (``qlib.workflow.record_temp``...), so it is not checked.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from typing import Any
from urllib.parse import urlparse

from qlib_ext import defaults
from qlib_ext.errors import ModuleNotAllowed

FILE_PREFIX = "file://"
"""Qlib's pickle reference scheme (``init_instance_by_config("file:///x.pkl")`` unpickles the file)."""


def parse(value: str | Iterable[str] | None) -> tuple[str, ...] | None:
    """Prefixes from a comma-separated string or a list; None stays None (not configured)."""
    if value is None:
        return None
    items = value.split(",") if isinstance(value, str) else list(value)
    return tuple(s.strip() for s in items if s and s.strip())


def resolve(explicit: Iterable[str] | None = None, workflow: Iterable[str] | None = None) -> tuple[str, ...]:
    """The worker's allow-list.

    The worker side decides: ``--allow-module`` values (or ``allow_module`` in the profile), else
    ``$QLIB_EXT_ALLOWED_MODULES``, replace the default outright and ignore the workflow. Only when neither
    is set does the workflow's ``workers.allowed_modules`` (recorded in the pool) add to the default:
    whoever can write the pool can write that too, so it guards against mistakes, not attackers.

    Args:
        explicit: worker-side prefixes (each item may be comma-separated).
        workflow: the pool's ``workers.allowed_modules``.
    """
    for source in (explicit, os.environ.get(defaults.ALLOWED_MODULES_ENV)):
        prefixes = parse(",".join(source) if source is not None and not isinstance(source, str) else source)
        if prefixes:
            return prefixes
    return tuple(dict.fromkeys((*defaults.ALLOWED_MODULES, *(parse(workflow) or ()))))


def is_file_reference(value: str) -> bool:
    """Whether Qlib would unpickle ``value``: decided by Qlib's own test, ``urlparse(value).scheme == "file"``
    (``init_instance_by_config``), so whatever urllib normalises (case, leading blanks and control
    characters, tabs and newlines anywhere: ``FILE:///x``, `` file:///x``, ``fi\tle:///x``, ``file:x``) counts."""
    try:
        return urlparse(value).scheme == "file"
    except ValueError:  # unparsable (a bad IPv6 netloc): Qlib's urlparse raises the same, nothing is opened
        return False


def _is_path(text: str) -> bool:
    """Whether Qlib loads ``text`` as a file: ``get_module_by_module_path`` does for a name ending in ``.py``."""
    return text.endswith(".py")


def _is_directory_prefix(prefix: str) -> bool:
    """A prefix written as a path (it has a ``/``) that names an existing directory."""
    return "/" in prefix and os.path.isdir(prefix)


def _inside(path: str, directory: str) -> bool:
    """Whether ``path`` (relative to the cwd, as Qlib opens it) resolves inside ``directory``; links resolved."""
    real, root = os.path.realpath(path), os.path.realpath(directory)
    return os.path.commonpath([real, root]) == root


def _module_parts(module: str) -> list[str] | None:
    """The parts of a dotted module name, or None when it is not one (``qlib./../x``, ``a..b``, ``.a``)."""
    parts = module.split(".")
    return parts if all(p.isidentifier() for p in parts) else None


def _allowed(module: str, prefixes: tuple[str, ...]) -> bool:
    """Whether ``module`` (a dotted name or a ``.py`` path) falls under one of ``prefixes``.

    Compared after normalising, never as strings: a ``.py`` path is resolved (``..`` and links) and allowed
    only inside a prefix that is a directory (``/opt/lab/``); a dotted name must be one (identifiers
    between single dots) and match a dotted prefix part by part (``qlib.`` admits ``qlib`` and
    ``qlib.contrib``, not ``qlibx``; ``lightgbm`` admits ``lightgbm.sklearn``).
    """
    if _is_path(module):
        return any(_is_directory_prefix(p) and _inside(module, p) for p in prefixes)
    parts = _module_parts(module)
    if parts is None:
        return False
    for prefix in prefixes:
        wanted = _module_parts(prefix.rstrip("."))
        if wanted is not None and parts[:len(wanted)] == wanted:
            return True
    return False


def references(node: Any, path: str = "") -> Iterator[tuple[str, str]]:
    """``(key path, module or file reference)`` of everything in ``node`` that Qlib would import or unpickle."""
    if isinstance(node, dict):
        for key in ("class", "func"):
            value = node.get(key)
            if isinstance(value, str) and "." in value:
                yield f"{path}{key}", value.rsplit(".", 1)[0]
        if isinstance(node.get("module_path"), str):
            yield f"{path}module_path", node["module_path"]
        for key, value in node.items():
            yield from references(value, f"{path}{key}.")
    elif isinstance(node, (list, tuple)):
        for i, value in enumerate(node):
            yield from references(value, f"{path}{i}.")
    elif isinstance(node, str) and is_file_reference(node):
        yield path.rstrip("."), FILE_PREFIX


def check_modules(task: dict, prefixes: tuple[str, ...]) -> None:
    """Refuse a task naming code outside ``prefixes``.

    Raises:
        ModuleNotAllowed: naming the first offending key path, what it names and the allow-list.
    """
    for where, module in references(task):
        if module == FILE_PREFIX and FILE_PREFIX in prefixes:
            continue
        if module == FILE_PREFIX or not _allowed(module, prefixes):
            what = "a pickle file reference (file://...)" if module == FILE_PREFIX else f"module {module!r}"
            raise ModuleNotAllowed(
                f"task key {where} names {what}, which is not on this worker's allow-list "
                f"({', '.join(prefixes)}); if you trust whoever writes this pool, add its prefix on the workers "
                f"(--allow-module, allow_module in the profile, or {defaults.ALLOWED_MODULES_ENV}) or in the "
                f"workflow's workers.allowed_modules")
