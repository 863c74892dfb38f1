"""Per-host settings from a small ``qlib-ext.toml`` profile, so a host's launcher is one line.

The profile becomes click's ``default_map``; click then applies the precedence we want without any
code of ours: **flag > environment variable > profile > pool metadata > built-in default** (pool
metadata only fills values still unset, in :func:`qlib_ext.worker.settings.settings_from_meta`). Example::

    # qlib-ext.toml — top-level keys apply to every command that has the option
    mongo_url = "mongodb://tasks.lab:27017/"
    mlflow_uri = "http://tasks.lab:5000"
    provider_uri = "/mnt/qlib_data/cn"
    workers = 4
    lease_seconds = 300

    [worker]            # a table applies to one command (nested for groups: [mlflow.serve])
    threads = 2

The file is found at ``--profile PATH``, else ``$QLIB_EXT_PROFILE``, else ``./qlib-ext.toml``, else
``$QLIB_EXT_HOME/qlib-ext.toml`` (``~/.qlib-ext/qlib-ext.toml``).
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Any

import click

from qlib_ext import defaults
from qlib_ext.errors import ConfigError

logger = logging.getLogger(__name__)

PROFILE_ENV = "QLIB_EXT_PROFILE"
"""Environment variable naming the profile file."""

PROFILE_NAME = "qlib-ext.toml"
"""File name looked up in the working directory and in the qlib-ext home."""


LOGIN_KEYS = {"mlflow_username": "MLFLOW_TRACKING_USERNAME", "mlflow_password": "MLFLOW_TRACKING_PASSWORD"}
"""Profile keys that are no option: the MLflow server's login, exported as MLflow's client variables (the
environment wins) so that every MLflow client of the command and its workers logs in."""

_URL_PASSWORD = re.compile(r"(\w[\w+.-]*://[^:/@\s]+):[^@\s]+@")


def redact_url_passwords(text: str) -> str:
    """``mongodb://user:secret@host`` -> ``mongodb://user:***@host`` (for anything that gets logged)."""
    return _URL_PASSWORD.sub(r"\1:***@", text)


def find_profile(explicit: str | Path | None = None) -> Path | None:
    """The profile to use: ``explicit`` (flag or env, must exist), else the first file found.

    Raises:
        ConfigError: ``explicit`` names a file that does not exist.
    """
    if explicit:
        path = Path(explicit).expanduser()
        if not path.is_file():
            raise ConfigError(f"profile {str(path)!r} not found (from --profile or ${PROFILE_ENV})")
        return path
    home = Path(os.environ.get(defaults.HOME_ENV) or defaults.DEFAULT_HOME).expanduser()
    for path in (Path.cwd() / PROFILE_NAME, home / PROFILE_NAME):
        if path.is_file():
            return path
    return None


def load_default_map(group: click.Group, explicit: str | Path | None = None) -> dict[str, Any] | None:
    """Find, read and convert the profile for ``group``; None when there is no profile.

    Raises:
        ConfigError: see :func:`find_profile`, :func:`read_profile`, :func:`default_map`.
    """
    path = find_profile(explicit)
    if path is None:
        return None
    logger.info("profile: %s", path)
    profile = read_profile(path)
    _export_login(profile)
    return default_map(profile, group, str(path))


def _export_login(profile: dict[str, Any]) -> None:
    """Take :data:`LOGIN_KEYS` out of ``profile`` into the environment, unless the environment has a login."""
    login = {k: profile.pop(k) for k in list(LOGIN_KEYS) if k in profile}
    if login and not any(os.environ.get(v) for v in LOGIN_KEYS.values()):
        os.environ.update({LOGIN_KEYS[k]: str(v) for k, v in login.items()})


def read_profile(path: Path) -> dict[str, Any]:
    """Parse a profile file (TOML).

    Raises:
        ConfigError: the file is not valid TOML (or this Python has no ``tomllib``).
    """
    try:
        import tomllib
    except ImportError as e:  # setup.cfg still admits Python 3.10
        raise ConfigError(f"profile {path}: reading TOML needs Python 3.11+ (tomllib)") from e
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"profile {path}: not valid TOML: {e}") from e


def default_map(profile: dict[str, Any], group: click.Group, source: str) -> dict[str, Any]:
    """Turn a profile into click's ``default_map`` for ``group``'s command tree.

    Top-level scalars go to every command that has an option of that name; a table named after a
    command (or group) sets that command's options and wins over the top level.

    Raises:
        ConfigError: a key no command accepts, or a table no command is named after (the message
            lists the valid names).
    """
    shared = {k: v for k, v in profile.items() if not isinstance(v, dict)}
    # The root group's own options (-v, --profile) are parsed before the profile is read.
    _check_keys(shared, set().union(*map(_option_names, group.commands.values())), source)
    tables = {k: v for k, v in profile.items() if isinstance(v, dict)}
    return _command_map(group, shared, tables, source, "")


def _command_map(cmd: click.Command, shared: dict, table: dict, source: str, path: str) -> dict[str, Any]:
    """``default_map`` of one command: the shared keys it accepts, overridden by its own table."""
    where = f"{source} [{path}]" if path else source
    names = _keys(cmd)
    subs: dict[str, click.Command] = getattr(cmd, "commands", {})
    own = {k: v for k, v in table.items() if not isinstance(v, dict)}
    _check_keys(own, set(names), where)
    for key in table:
        if isinstance(table[key], dict) and key not in subs:
            raise ConfigError(f"profile {where}: [{key}] is not a command; "
                              f"expected one of: {', '.join(sorted(subs)) or '(none here)'}")
    out: dict[str, Any] = {names[k]: v for k, v in {**shared, **own}.items() if k in names}
    for name, sub in subs.items():
        out[name] = _command_map(sub, shared, table.get(name, {}), source, f"{path}.{name}".lstrip("."))
    return out


def _check_keys(values: dict, names: set[str], source: str) -> None:
    unknown = sorted(set(values) - names)
    if unknown:
        raise ConfigError(f"profile {source}: unknown key(s) {', '.join(unknown)}; "
                          f"expected one of: {', '.join(sorted(names))}")


def _keys(cmd: click.Command) -> dict[str, str]:
    """Profile key -> click parameter name: the long flag with ``_`` for ``-`` (``--dir`` -> ``dir``)."""
    keys = {}
    for p in cmd.params:
        longs = [o for o in p.opts if o.startswith("--")] if isinstance(p, click.Option) else []
        if longs:
            keys[max(longs, key=len)[2:].replace("-", "_")] = p.name
    return keys


def _option_names(cmd: click.Command) -> set[str]:
    """Every profile key of ``cmd`` and its subcommands."""
    names = set(_keys(cmd))
    for sub in getattr(cmd, "commands", {}).values():
        names |= _option_names(sub)
    return names
