"""The ``qlib-ext`` command line. Thin: every command imports its heavy module only when it runs,
so ``qlib-ext --help`` never imports qlib, mlflow or lightgbm."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import click

from qlib_ext.errors import QlibExtError


class _Group(click.Group):
    """Turns qlib-ext's own errors into one readable line and exit code 2, not a traceback."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except QlibExtError as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(2)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", count=True, help="More log output (-v info, -vv debug).")
@click.version_option(package_name="qlib-ext")
def main(verbose: int) -> None:
    """Run grids of Qlib research tasks on a TaskManager pool with many worker processes."""
    level = [logging.WARNING, logging.INFO, logging.DEBUG][min(verbose, 2)]
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


# --------------------------------------------------------------------------- data
@main.group(cls=_Group)
def data() -> None:
    """Make, import and inspect Qlib-format datasets."""


@data.command("synth")
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Output directory.")
@click.option("--instruments", default=300, show_default=True, help="Number of stocks.")
@click.option("--days", default=1500, show_default=True, help="Number of trading days.")
@click.option("--start", default="2015-01-05", show_default=True, help="First trading day.")
@click.option("--seed", default=0, show_default=True, help="Random seed (same seed, same data).")
@click.option("--market", default="csi300", show_default=True, help="Name of the instrument list.")
def data_synth(out: Path, instruments: int, days: int, start: str, seed: int, market: str) -> None:
    """Write a synthetic Qlib dataset with planted, learnable cross-sectional alpha."""
    from qlib_ext.data.synth import write_synthetic

    summary = write_synthetic(out, instruments=instruments, days=days, start=start, seed=seed, market=market)
    click.echo(summary)


@data.command("import-csv")
@click.argument("files", nargs=-1, required=True, type=click.Path(exists=True, path_type=Path))
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Output directory.")
@click.option("--market", default="all", show_default=True, help="Name of the instrument list.")
@click.option("--benchmark", default=None, help="Symbol to keep as a benchmark index (not in lists).")
def data_import_csv(files: tuple[Path, ...], out: Path, market: str, benchmark: str | None) -> None:
    """Convert long-format CSV (date, symbol, open, high, low, close, volume) to Qlib format."""
    from qlib_ext.data.csv_import import import_csv

    summary = import_csv(list(files), out, market=market, benchmark=benchmark)
    click.echo(summary)


@data.command("info")
@click.argument("path", type=click.Path(exists=True, file_okay=False, path_type=Path))
def data_info(path: Path) -> None:
    """Show instruments, date range, fields and missing-data share of a Qlib dataset."""
    from qlib_ext.data.info import describe

    click.echo(describe(path))


# --------------------------------------------------------------------------- store
@main.group(cls=_Group)
def store() -> None:
    """The embedded MongoDB-compatible task store."""


@store.command("serve")
@click.option("--dir", "dir_", type=click.Path(path_type=Path), default=None,
              help="Data directory (default: $QLIB_EXT_HOME/store).")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind.")
@click.option("--port", default=27017, show_default=True, help="TCP port (0 = any free port).")
def store_serve(dir_: Path | None, host: str, port: int) -> None:
    """Run the store in the foreground until SIGTERM/SIGINT."""
    from qlib_ext.store import serve

    serve(dir_, host=host, port=port)


@store.command("url")
@click.option("--dir", "dir_", type=click.Path(path_type=Path), default=None,
              help="Data directory (default: $QLIB_EXT_HOME/store).")
def store_url(dir_: Path | None) -> None:
    """Print the MongoDB URL of the store running on DIR."""
    from qlib_ext.store import running_url

    url = running_url(dir_)
    if url is None:
        raise click.ClickException("no store is running there; start one with `qlib-ext store serve`")
    click.echo(url)
