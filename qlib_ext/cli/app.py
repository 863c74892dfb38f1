"""The ``qlib-ext`` group and what its commands share: the error handling, the options generated from the
run session's one definition (:class:`qlib_ext.session.options.RunOptions`) and the printing reporter."""

from __future__ import annotations

import functools
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from qlib_ext import defaults
from qlib_ext.errors import QlibExtError
from qlib_ext.session.options import Option, options_for
from qlib_ext.tables import log_to_terminal, printable


class _Group(click.Group):
    """Turns qlib-ext's own errors into one readable line and exit code 2, not a traceback."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except QlibExtError as e:
            echo(f"error: {e}", err=True)
            sys.exit(2)
        except click.ClickException as e:  # click prints it: its text may quote pool data too
            e.message = printable(e.message, keep="\n\t")  # type: ignore[misc]  # Final in typeshed only
            raise


def echo(text: object = "", err: bool = False, nl: bool = True) -> None:
    """Print one message of the command line (stdout, or stderr with ``err``): the one place where output
    leaves qlib-ext, so pool data (axis values, pool and run names, errors) reaches the terminal with its
    control characters escaped (:func:`qlib_ext.tables.printable`)."""
    click.echo(printable(text, keep="\n\t"), err=err, nl=nl)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", count=True, help="More log output (-v info, -vv debug).")
@click.option("--profile", "profile_path", envvar="QLIB_EXT_PROFILE", default=None,
              type=click.Path(dir_okay=False, path_type=Path),
              help="Settings file (TOML) giving option defaults, e.g. mongo_url, mlflow_uri, provider_uri, "
                   "workers (default: ./qlib-ext.toml, else $QLIB_EXT_HOME/qlib-ext.toml). Precedence: "
                   "flag > env var > profile > pool metadata > built-in. Env: QLIB_EXT_PROFILE.")
@click.version_option(package_name="qlib-ext")
@click.pass_context
def main(ctx: click.Context, verbose: int, profile_path: Path | None) -> None:
    """Run grids of Qlib research tasks on a TaskManager pool with many worker processes."""
    from qlib_ext.profile import load_default_map, redact_url_passwords

    level = [logging.WARNING, logging.INFO, logging.DEBUG][min(verbose, 2)]
    log_to_terminal(level)  # log lines quote pool data too: control characters escaped
    _quiet_gym_banner()
    # Subcommand contexts are made after this callback, so they inherit the profile's defaults.
    ctx.default_map = load_default_map(main, profile_path)
    from qlib_ext.tracking.server import export_client_credentials

    export_client_credentials()  # this user's own MLflow server's login, unless env or profile gave one
    # Qlib logs sys.argv as the MLflow param cmd-sys.argv in every run: no URL passwords there.
    sys.argv[:] = [redact_url_passwords(a) for a in sys.argv]
    # MLflow draws a "Downloading artifacts" bar per artifact read (leaderboard, report): not in our output.
    import os

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


def _quiet_gym_banner() -> None:
    """pyqlib's strategy module imports gym, which prints a multi-line "Gym has been unmaintained"
    banner to stderr on import; qlib-ext never uses gym. gym reads the banner from
    ``gym_notices.notices``: an empty stand-in module there keeps every command's output readable."""
    import types

    if "gym_notices.notices" not in sys.modules:
        stand_in = types.ModuleType("gym_notices.notices")
        stand_in.notices = {}  # type: ignore[attr-defined]
        sys.modules["gym_notices.notices"] = stand_in


# --------------------------------------------------------------------------- options from RunOptions
def session_options(command: str, only: tuple[str, ...] = ()) -> Callable[[Callable], Callable]:
    """Decorator: the click options of every :class:`RunOptions` field ``command`` has (or of ``only``)."""

    def decorate(f: Callable) -> Callable:
        for name, default, option in reversed(options_for(command)):
            if not only or name in only:
                f = click.option(*_declarations(name, option), **_settings(default, option))(f)
        return f

    return decorate


def _declarations(name: str, option: Option) -> list[str]:
    return [*([option.short] if option.short else []), option.flag(name), name]


def _settings(default: Any, option: Option) -> dict[str, Any]:
    """click's keyword arguments for one option: help, env var, default and type (a flag for ``bool``)."""
    kw: dict[str, Any] = {"help": option.help, "default": default, "show_default": option.show_default}
    if option.env:
        kw["envvar"] = option.env
    if option.metavar:
        kw["metavar"] = option.metavar
    if option.multiple:
        kw["multiple"] = True
    elif option.type is bool:
        kw["is_flag"] = True
    elif option.minimum is not None:
        kw["type"] = (click.IntRange if option.type is int else click.FloatRange)(min=option.minimum)
    else:
        kw["type"] = option.type
    return kw


def mongo_option(f: Callable) -> Callable:
    """``--mongo-url`` and ``--task-db`` (commands that read a pool); ``--task-db`` becomes the task database of
    the whole command (:func:`qlib_ext.defaults.use_task_db`), so ``f`` never sees it."""

    @functools.wraps(f)
    def with_task_db(*args: Any, task_db: str | None = None, **kwargs: Any) -> Any:
        defaults.use_task_db(task_db)
        return f(*args, **kwargs)

    return session_options("run", ("mongo_url", "task_db"))(with_task_db)


def mlflow_option(f: Callable) -> Callable:
    """``--mlflow-uri`` alone."""
    return session_options("run", ("mlflow_uri",))(f)


def provider_option(f: Callable) -> Callable:
    """``--provider-uri`` alone."""
    return session_options("run", ("provider_uri",))(f)


def pool_name(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    """click callback of every POOL argument and ``--pool`` option: the name checked by
    :func:`qlib_ext.names.check_pool_name` before the command touches anything."""
    from qlib_ext.errors import ConfigError
    from qlib_ext.names import check_pool_name

    if value is None:
        return None
    try:
        return check_pool_name(value)
    except ConfigError as e:
        raise click.BadParameter(str(e), ctx=ctx, param=param) from e


def printer() -> Any:
    """The session reporter of the command line: messages on stdout, warnings on stderr, the progress line; the
    grid plots drawn in the background once the summary is printed."""
    from qlib_ext.session.run import Reporter

    return Reporter(echo=echo, warn=lambda text: echo(text, err=True), progress=True, plots_later=True)
